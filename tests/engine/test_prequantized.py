"""GPTQ and AWQ directories load as they are. The default model is written in each standard
layout (the same round-to-nearest codes with integer zero points, groups of 64, float16
scales); each loads with every module's int4 values equal to the format's own dequantization,
the two give bit-identical int4 storage, and the GPTQ one serves. Unsupported variants are
refused with a message."""

from __future__ import annotations

import json

import pytest
import torch

from engine import LLM, SamplingParams, build
from engine.checkpoint import hf_config_dict
from engine.config import EngineConfig
from engine.errors import CheckpointError, ConfigError
from engine.loader import _SHARDS
from engine.prequantized import PrequantizedFormat
from engine.quant import external

GROUP = 64
HF_NAME = {target: name for name, target in _SHARDS.items()}


def _rtn(w: torch.Tensor, group: int):
    """[N, K] -> codes q [N, K], zero points z [G, N] (1..15, so GPTQ v1 can store z - 1) and
    float16-representable scales [G, N]: asymmetric round-to-nearest."""
    N, K = w.shape
    wg = w.reshape(N, K // group, group)
    lo, hi = wg.amin(2).clamp(max=0), wg.amax(2).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-6).half().float()
    z = torch.round(-lo / scale).clamp(1, 15)
    q = torch.clamp(torch.round(wg / scale[..., None]) + z[..., None], 0, 15)
    return q.reshape(N, K).int(), z.T.int().contiguous(), scale.T.contiguous()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"gptq": dir, "awq": dir} and, per module, the float32 weight each format's own
    dequantization gives."""
    from safetensors.torch import save_file

    src = build.load(EngineConfig(quant="bf16"), progress=False, prepare=False)
    files = {"gptq": {}, "awq": {}}
    expect: dict[str, dict[str, torch.Tensor]] = {"gptq": {}, "awq": {}}
    for name, lin in src.model.quant_linears().items():
        if name == "lm_head":
            continue  # tied to the embedding, as in the original
        _, layer, module = name.split(".", 2)
        w, start = lin.method.dequantize(), 0
        parts = {"gptq": [], "awq": []}
        for shard, size in enumerate(lin.shard_sizes):
            prefix = f"model.layers.{layer}.{HF_NAME[module, shard]}"
            q, z, s = _rtn(w[start:start + size], GROUP)
            start += size
            g_idx = external.group_index(q.shape[1], GROUP).int()
            gptq = dict(zip(("qweight", "qzeros", "scales", "g_idx"),
                            external.gptq_pack(q, z, s, g_idx, 4, 1), strict=True))
            awq = dict(zip(("qweight", "qzeros", "scales"), external.awq_pack(q, z, s), strict=True))
            for fmt, packed in (("gptq", gptq), ("awq", awq)):
                files[fmt].update({f"{prefix}.{k}": v.contiguous() for k, v in packed.items()})
            parts["gptq"].append(external.gptq_dequantize(*gptq.values(), 4, 1))
            parts["awq"].append(external.awq_dequantize(*awq.values(), GROUP))
        for fmt in parts:
            expect[fmt][name] = torch.cat(parts[fmt], 0)
    quant = {"gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
                      "sym": False, "checkpoint_format": "gptq"},
             "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm",
                     "zero_point": True}}
    dirs = {}
    for fmt, tensors in files.items():
        out = tmp_path_factory.mktemp(fmt)
        for pname, p in src.model.named_parameters():
            tensors[f"model.{pname}"] = p.data.to(torch.float16).contiguous()
        save_file(tensors, str(out / "model.safetensors"))
        config = hf_config_dict(src.config) | {"quantization_config": quant[fmt]}
        (out / "config.json").write_text(json.dumps(config))
        src.tokenizer.save_pretrained(str(out))
        dirs[fmt] = out
    return dirs, expect


@pytest.mark.slow
def test_gptq_and_awq_load_to_the_formats_own_values(checkpoints):
    dirs, expect = checkpoints
    stored = {}
    for fmt, path in dirs.items():
        loaded = build.load(EngineConfig(model=str(path)), progress=False, prepare=False)
        linears = loaded.model.quant_linears()
        assert str(linears["lm_head"].spec) == "bf16"
        for name, want in expect[fmt].items():
            assert str(linears[name].spec) == "int4-g64"
            assert torch.equal(linears[name].method.dequantize(), want), (fmt, name)
        stored[fmt] = {n: linears[n].method.stored for n in expect[fmt]}
    # the same codes in either layout become the same int4 storage, bit for bit
    for name, tensors in stored["gptq"].items():
        assert all(torch.equal(t, stored["awq"][name][k]) for k, t in tensors.items()), name


@pytest.mark.slow
def test_a_gptq_directory_serves(checkpoints):
    dirs, _ = checkpoints
    llm = LLM(str(dirs["gptq"]), max_model_len=256, kv_cache_memory=int(5e7))
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=12, temperature=0))[0]
    assert "Paris" in out.text, out.text
    with pytest.raises(ConfigError, match="already quantized"):
        build.load(EngineConfig(model=str(dirs["gptq"]), quant="int8"), progress=False)


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "act-order"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8-bit GPTQ is not supported yet"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 96}, "group size 96"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "GEMM layout"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not supported"),
])
def test_unsupported_quantizations_are_refused(tmp_path, quant, message):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    with pytest.raises(CheckpointError, match=message):
        PrequantizedFormat.read(tmp_path)


def test_formats_read_from_either_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert PrequantizedFormat.read(tmp_path) is None
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32,
                                                               "checkpoint_format": "gptq_v2"}))
    assert PrequantizedFormat.read(tmp_path) == PrequantizedFormat("gptq", 32, 0)
