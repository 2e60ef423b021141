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

import torch
from torch import Tensor

from engine.checkpoint import hf_config_dict
from engine.errors import ConfigError
from engine.loader import SHARDS
from engine.prequantized import PARTS
from engine.progress import progress_bar
from engine.quant import external
from engine.quant.gptq import GPTQResult, gptq_quantize, rtn_quantize

HF_NAME = {target: name for name, target in SHARDS.items()}


def _observe(llm, chunks: list[list[int]], observe, progress: bool) -> None:
    """Runs the model over `chunks` with observe(name, x [T, K]) called on the input of every
    linear layer but lm_head."""
    hooks = [lin.register_forward_pre_hook(
        lambda _m, args, name=name: observe(name, args[0].reshape(-1, args[0].shape[-1])))
        for name, lin in llm.model.quant_linears().items() if name != "lm_head"]
    try:
        for chunk in progress_bar(chunks, desc="calibrating", unit="chunk", enabled=progress):
            llm.score(chunk)
    finally:
        for h in hooks:
            h.remove()


def collect_hessians(llm, chunks: list[list[int]], progress: bool = True) -> dict[str, Tensor]:
    """X^T X (float64) of the inputs of every linear layer but lm_head, over `chunks`."""
    hessians: dict[str, Tensor] = {}

    def accumulate(name: str, x: Tensor) -> None:
        x = x.double()
        h = hessians.get(name)
        hessians[name] = x.T @ x if h is None else h.add_(x.T @ x)

    _observe(llm, chunks, accumulate, progress)
    return hessians


def collect_absmax(llm, chunks: list[list[int]], per_feature: bool = True,
                   progress: bool = True) -> dict[str, Tensor]:
    """The largest |x| of the input of every linear layer but lm_head over `chunks`, float32:
    per input feature ([K], per_feature) or over the whole tensor ([1])."""
    absmax: dict[str, Tensor] = {}

    def record(name: str, x: Tensor) -> None:
        m = x.abs().amax(0) if per_feature else x.abs().amax().reshape(1)
        m = m.float()
        have = absmax.get(name)
        absmax[name] = m if have is None else torch.maximum(have, m)

    _observe(llm, chunks, record, progress)
    return absmax


def quantize_model(model, hessians: dict[str, Tensor] | None, bits: int, group_size: int,
                   progress: bool = True, act_order: bool = False) -> dict[str, GPTQResult]:
    """GPTQ for every linear layer but lm_head (round-to-nearest without hessians)."""
    out = {}
    linears = {n: m for n, m in model.quant_linears().items() if n != "lm_head"}
    for name in progress_bar(list(linears), desc="quantizing", unit="layer", enabled=progress):
        w = linears[name].method.dequantize()
        out[name] = (gptq_quantize(w, hessians[name], bits, group_size, act_order=act_order)
                     if hessians is not None else rtn_quantize(w, bits, group_size))
    return out


def save_packed(model, tokenizer, results: dict[str, GPTQResult], out: Path, layout: str,
                group_size: int, extra: dict | None = None, bits: int = 4) -> Path:
    """A Hugging Face directory in the GPTQ layout (classic "gptq" format: qzeros hold z - 1;
    4 or 8 bits, desc_act when the results are act-ordered) or AutoAWQ's GEMM layout (4 bits):
    q/k/v and gate/up split back apart, the other tensors in float16, config.json with its
    quantization_config, and the tokenizer."""
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
            packed = (external.gptq_pack(q, z, s, r.g_idx, bits, 1) if layout == "gptq"
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
    desc_act = any(external.is_act_order(r.g_idx, group_size) for r in results.values())
    quant = ({"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
              "sym": False, "checkpoint_format": "gptq"} if layout == "gptq" else
             {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm",
              "zero_point": True})
    config = hf_config_dict(model.config) | {"quantization_config": quant | (extra or {}),
                                             "torch_dtype": "float16"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    return out


def check_options(method: str, bits: int, group_size: int, act_order: bool = False) -> None:
    from engine.config import VALID_GROUPS

    if method not in ("gptq", "awq"):
        raise ConfigError(f"--method {method!r}: choose gptq or awq (or rtn)")
    if act_order and method != "gptq":
        raise ConfigError("--act-order is a GPTQ option (the order columns are quantized in); "
                          "drop it or use --method gptq")
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise ConfigError(f"--bits {bits}: GPTQ checkpoints are written with 4 or 8 bits, AWQ "
                          "checkpoints (the GEMM layout) with 4")
    if group_size not in VALID_GROUPS:
        raise ConfigError(f"--group-size {group_size}: use one of {', '.join(map(str, VALID_GROUPS))}")


# ------------------------------------------------------------------------------------------ AWQ

AWQ_GRID = 20  # exponents 0, 1/20, ..., 19/20 tried per group of layers


def collect_inputs(llm, chunks: list[list[int]], rows: int = 256,
                   progress: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
    """Per linear layer but lm_head: (mean |x| per input feature over `chunks`, the first
    `rows` input rows, float32)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    samples: dict[str, Tensor] = {}

    def record(name: str, x: Tensor) -> None:
        x = x.float()
        sums[name] = x.abs().sum(0) + sums.get(name, 0)
        counts[name] = counts.get(name, 0) + x.shape[0]
        have = samples.get(name)
        if have is None or have.shape[0] < rows:
            samples[name] = x[:rows] if have is None else torch.cat([have, x])[:rows]

    _observe(llm, chunks, record, progress)
    return {n: (sums[n] / counts[n], samples[n]) for n in sums}


def fake_quantize(w: Tensor, group_size: int) -> Tensor:
    """w after 4-bit round-to-nearest and back (what the AWQ search scores)."""
    r = rtn_quantize(w, 4, group_size)
    g = r.g_idx.long()
    return r.scales[g].T * (r.q - r.z[g].T).float()


def awq_search(w: Tensor, x_mean: Tensor, x: Tensor, group_size: int) -> Tensor:
    """AWQ's activation-aware scales (Lin et al., 2023): s = mean|x|^a per input feature, with
    the exponent a from a grid that minimizes ||x W^T - x (Q(W diag(s)) diag(s)^-1)^T||;
    a = 0 (no scaling, round-to-nearest) is on the grid."""
    ref = x @ w.T
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for i in range(AWQ_GRID):
        s = x_mean.clamp(min=1e-4) ** (i / AWQ_GRID)
        s = s / (s.max() * s.min()).sqrt()
        loss = float(((x @ (fake_quantize(w * s, group_size) / s).T - ref) ** 2).mean())
        if loss < best:
            best, best_s = loss, s
    return best_s


def fold_scales(model, i: int, w: dict[str, Tensor], key: str, s: Tensor) -> None:
    """Per-input-feature scales s [K] for linear layer `key` of decoder layer i (AWQ's and
    SmoothQuant's migration): its input is divided by s where it is produced and its weight's
    columns multiplied by s, so the float model computes the same function. The producer:
    input_layernorm for "self_attn.qkv_proj", post_attention_layernorm for
    "mlp.gate_up_proj" (the norm's weight, in place, in float32 rounded once), up's rows of
    w["mlp.gate_up_proj"] for "mlp.down_proj", v's rows of w["self_attn.qkv_proj"] for
    "self_attn.o_proj" (right only where every query head has its own value head). `w` holds
    the layer's float weights by key, changed in place; row and column scalings commute, so
    the keys fold in any order."""
    layer, cfg = model.layers[i], model.config
    if key == "self_attn.qkv_proj":
        _divide(layer.input_layernorm.weight, s)
    elif key == "mlp.gate_up_proj":
        _divide(layer.post_attention_layernorm.weight, s)
    elif key == "mlp.down_proj":
        w["mlp.gate_up_proj"][cfg.intermediate_size:] /= s[:, None]
    elif key == "self_attn.o_proj":
        w["self_attn.qkv_proj"][cfg.q_size + cfg.kv_size:] /= s[:, None]
    else:
        raise ValueError(f"no producer to fold scales for {key!r} into")
    w[key] *= s


def _divide(weight: Tensor, s: Tensor) -> None:
    """A norm's weight / s, computed in float32 and stored in the weight's dtype."""
    weight.data = (weight.data.float() / s.to(weight.device)).to(weight.dtype)


def awq_model(model, inputs: dict[str, tuple[Tensor, Tensor]], group_size: int,
              progress: bool = True) -> dict[str, GPTQResult]:
    """Per decoder layer: scales for q|k|v (folded into input_layernorm), gate|up (folded into
    post_attention_layernorm) and down (folded into up's output rows); o_proj keeps s = 1 unless
    every query head has its own value head (only then can v_proj's rows take the scales).
    The scaled weights are quantized to nearest; the norms are changed in `model` in place."""
    cfg = model.config
    out = {}
    for i in progress_bar(range(cfg.num_layers), desc="quantizing", unit="layer", enabled=progress):
        names = {k: f"layers.{i}.{k}" for k in ("self_attn.qkv_proj", "self_attn.o_proj",
                                               "mlp.gate_up_proj", "mlp.down_proj")}
        w = {k: model.get_submodule(n).method.dequantize() for k, n in names.items()}
        s = {k: awq_search(w[k], *inputs[n], group_size) for k, n in names.items()
             if k != "self_attn.o_proj" or cfg.num_heads == cfg.num_kv_heads}
        for k, scales in s.items():  # all searched on the unscaled weights, then folded
            fold_scales(model, i, w, k, scales)
        for k, n in names.items():
            out[n] = rtn_quantize(w[k], 4, group_size)
    return out
