"""`nibble quantize --method gptq`: calibration activations from a float copy of the model, GPTQ
per linear layer, and a checkpoint in the standard GPTQ layout that nibble and other tools
load.

The Hessians come from one pass of the unquantized model over the calibration text: every
layer sees float inputs (GPTQ's reference implementation instead quantizes layer by layer and
feeds each the outputs of the quantized layers before it). q, k and v share their input, so
one Hessian serves the fused projection, and so do gate and up.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from engine.checkpoint import hf_config_dict
from engine.errors import ConfigError
from engine.loader import SHARDS
from engine.progress import progress_bar
from engine.quant import external
from engine.quant.gptq import GPTQResult, gptq_quantize, rtn_quantize

HF_NAME = {target: name for name, target in SHARDS.items()}


def collect_hessians(llm, chunks: list[list[int]], progress: bool = True) -> dict[str, Tensor]:
    """X^T X (float64) of the inputs of every linear layer but lm_head, over `chunks`."""
    hessians: dict[str, Tensor] = {}
    hooks = []

    def hook(name):
        def accumulate(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            h = hessians.get(name)
            hessians[name] = x.T @ x if h is None else h.add_(x.T @ x)
        return accumulate

    for name, lin in llm.model.quant_linears().items():
        if name != "lm_head":
            hooks.append(lin.register_forward_pre_hook(hook(name)))
    try:
        for chunk in progress_bar(chunks, desc="calibrating", unit="chunk", enabled=progress):
            llm.score(chunk)
    finally:
        for h in hooks:
            h.remove()
    return hessians


def quantize_model(model, hessians: dict[str, Tensor] | None, bits: int, group_size: int,
                   progress: bool = True) -> dict[str, GPTQResult]:
    """GPTQ for every linear layer but lm_head (round-to-nearest without hessians)."""
    out = {}
    linears = {n: m for n, m in model.quant_linears().items() if n != "lm_head"}
    for name in progress_bar(list(linears), desc="quantizing", unit="layer", enabled=progress):
        w = linears[name].method.dequantize()
        out[name] = (gptq_quantize(w, hessians[name], bits, group_size) if hessians is not None
                     else rtn_quantize(w, bits, group_size))
    return out


PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}


def save_packed(model, tokenizer, results: dict[str, GPTQResult], out: Path, layout: str,
                group_size: int, extra: dict | None = None) -> Path:
    """A Hugging Face directory in the GPTQ layout (classic "gptq" format: qzeros hold z - 1)
    or AutoAWQ's GEMM layout, 4-bit: q/k/v and gate/up split back apart, the other tensors in
    float16, config.json with its quantization_config, and the tokenizer."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for name, r in results.items():
        _, layer, module = name.split(".", 2)
        lin, start = model.get_submodule(name), 0
        for shard, size in enumerate(lin.shard_sizes):
            rows = slice(start, start + size)
            start += size
            prefix = f"model.layers.{layer}.{HF_NAME[module, shard]}"
            q, z, s = r.q[rows], r.z[:, rows], r.scales[:, rows]
            packed = (external.gptq_pack(q, z, s, r.g_idx, 4, 1) if layout == "gptq"
                      else external.awq_pack(q, z, s))
            tensors.update({f"{prefix}.{k}": v.contiguous()
                            for k, v in zip(PARTS[layout], packed, strict=True)})
            if lin.bias is not None:
                tensors[f"{prefix}.bias"] = lin.bias[rows].half().contiguous()
    for pname, p in model.named_parameters():
        tensors[f"model.{pname}"] = p.data.half().contiguous()
    if not model.lm_head_shares_embedding():
        tensors["lm_head.weight"] = model.lm_head.method.dequantize().half().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    quant = ({"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
              "sym": False, "checkpoint_format": "gptq"} if layout == "gptq" else
             {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm",
              "zero_point": True})
    config = hf_config_dict(model.config) | {"quantization_config": quant | (extra or {}),
                                             "torch_dtype": "float16"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    return out


def check_options(method: str, bits: int, group_size: int) -> None:
    from engine.config import VALID_GROUPS

    if method not in ("gptq", "rtn"):
        raise ConfigError(f"--method {method!r}: choose gptq (or rtn)")
    if bits != 4:
        raise ConfigError(f"--bits {bits}: GPTQ checkpoints are written with 4 bits for now "
                          "(nibble loads 4-bit GPTQ)")
    if group_size not in VALID_GROUPS:
        raise ConfigError(f"--group-size {group_size}: use one of {', '.join(map(str, VALID_GROUPS))}")
