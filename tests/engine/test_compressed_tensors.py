"""compressed-tensors "pack-quantized" checkpoints (llm-compressor's W4A16 / W8A16), built by
the compressed-tensors library itself: its quantization parameters, its packing, its own
dequantization as the oracle. Each loads into int4 / int8-g with every weight equal to what the
library decompresses, and scores close to the float model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.base import (  # noqa: E402
    PackedQuantizationCompressor,
)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

from engine import LLM, build  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.errors import CheckpointError  # noqa: E402
from engine.prequantized import PrequantizedFormat  # noqa: E402
from engine.quant import external  # noqa: E402
from engine.quant.gptq import gptq_quantize  # noqa: E402
from tests.engine.fused import by_module  # noqa: E402


def _config(scheme: QuantizationScheme) -> dict:
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                              quantization_status="compressed", ignore=["lm_head"]).model_dump()


def _checkpoint(src, out, args: QuantizationArgs, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every linear layer of `src` but lm_head quantized with the library's min/max parameters
    and packed by its compressor into `out`; returns {HF prefix: the library's dequantization}."""
    from safetensors.torch import load_file

    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors, expect = {}, {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            tensors[name] = w.to(dtype)
            continue
        N, K = w.shape
        g = args.group_size if args.strategy == "group" else K
        wg = w.float().view(N, K // g, g)
        scale, zp = calculate_qparams(wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0), args)
        state = {"weight": w.float(), "weight_scale": scale.to(dtype),
                 "weight_zero_point": zp.to(torch.int8)}
        packed = PackedQuantizationCompressor.compress(state, scheme)
        prefix = name.removesuffix(".weight")
        tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in packed.items()})
        expect[prefix] = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    _write_dir(src, out, tensors, _config(scheme))
    return expect


def _write_dir(src, out, tensors: dict[str, torch.Tensor], quant: dict) -> None:
    """A Hugging Face directory: `tensors`, src's config with `quant`, src's tokenizer."""
    from safetensors.torch import save_file

    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


@pytest.mark.parametrize("args, spec", [
    (QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32), "int4-g32"),
    (QuantizationArgs(num_bits=4, symmetric=True, strategy="channel"), "int4"),
    (QuantizationArgs(num_bits=8, symmetric=True, strategy="group", group_size=32), "int8-g32"),
    (QuantizationArgs(num_bits=8, symmetric=False, strategy="channel"), "int8-g128"),
], ids=["w4-g32-asym", "w4-channel-sym", "w8-g32-sym", "w8-channel-asym"])
def test_the_librarys_checkpoints_load_to_its_own_values(tiny_llama, tmp_path, args, spec):
    out = tmp_path / "ct"
    expect = by_module(_checkpoint(tiny_llama, out, args))
    loaded = build.load(EngineConfig(model=str(out)), progress=False, prepare=False)
    linears = loaded.model.quant_linears()
    assert str(linears.pop("lm_head").spec) == "bf16"  # in the config's ignore list
    assert set(linears) == set(expect)
    for name, lin in linears.items():
        assert str(lin.spec) == spec and lin.input_perm is None
        want = expect[name]  # the library dequantizes in the scale's dtype: round ours once
        assert torch.equal(lin.method.dequantize().to(want.dtype), want), name
    ids = list(range(100, 140))
    ref = LLM(str(tiny_llama), quant="fp32", progress=False, max_model_len=128).score(ids)
    got = LLM(str(out), progress=False, max_model_len=128).score(ids)
    assert (got.float() - ref).abs().max() <= (0.02 if args.num_bits == 8 else 0.2) * ref.abs().max()


def test_act_order_g_idx_is_served_in_the_stored_order(tiny_llama, tmp_path):
    """Checkpoints from llm-compressor versions with actorder "group" store weight_g_idx (the
    library has since dropped that option, so the tensors are packed with ours and the config
    says "group"): a module's columns sorted by group equal the format's values in the same
    order."""
    from safetensors.torch import load_file

    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors, expect = {}, {}
    for name, w in load_file(str(tiny_llama / "model.safetensors")).items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            tensors[name] = w.half()
            continue
        # one input per width, as q, k and v (gate and up) share theirs: the same order
        K = w.shape[1]
        x = torch.randn(256, K, generator=torch.Generator().manual_seed(K)) * torch.linspace(0.1, 3, K)
        r = gptq_quantize(w, x.T.double() @ x.double(), 4, 32, act_order=True)
        assert external.is_act_order(r.g_idx, 32)
        scales = r.scales.half()
        packed, zp = external.ct_pack(r.q, r.z, 4)
        prefix = name.removesuffix(".weight")
        tensors.update({f"{prefix}.weight_packed": packed, f"{prefix}.weight_zero_point": zp,
                        f"{prefix}.weight_scale": scales.T.contiguous(),
                        f"{prefix}.weight_shape": torch.tensor(list(w.shape)),
                        f"{prefix}.weight_g_idx": r.g_idx})
        g = r.g_idx.long()
        expect[prefix] = scales.float()[g].T * (r.q - r.z[g].T).float()
    out = tmp_path / "ct-act-order"
    quant = _config(scheme)
    quant["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    _write_dir(tiny_llama, out, tensors, quant)
    fmt = PrequantizedFormat.read(out)
    assert fmt.act_order and "weight_g_idx" in fmt.parts
    loaded = build.load(EngineConfig(model=str(out)), progress=False, prepare=False)
    for name, want in by_module(expect).items():
        lin = loaded.model.quant_linears()[name]
        assert lin.input_perm is not None
        assert torch.equal(lin.method.dequantize(), want[:, lin.input_perm]), name


@pytest.mark.parametrize("quant, message", [
    ({"format": "float-quantized"}, "format 'float-quantized'"),
    ({"format": "pack-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 4, "strategy": "group", "group_size": 128},
        "input_activations": {"num_bits": 8}}}}, "quantize activations"),
    ({"format": "pack-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 4, "strategy": "tensor"}}}}, "strategy 'tensor'"),
    ({"format": "pack-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 2, "strategy": "group", "group_size": 128}}}}, "2 bits"),
    ({"format": "pack-quantized", "config_groups": {
        "a": {"weights": {"num_bits": 4, "strategy": "group", "group_size": 128}},
        "b": {"weights": {"num_bits": 8, "strategy": "channel"}}}}, "different weight schemes"),
])
def test_unsupported_schemes_are_refused(tmp_path, quant, message):
    config = {"quantization_config": {"quant_method": "compressed-tensors", **quant}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        PrequantizedFormat.read(tmp_path)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips_against_the_library(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(0, 1 << bits, (24, 100), dtype=torch.int32)
    ours, _ = external.ct_pack(q, None, bits)
    theirs = pack_to_int32((q - (1 << (bits - 1))).to(torch.int8), bits)
    assert torch.equal(ours, theirs)
    back, _, _ = external.ct_unpack(theirs, (24, 100), torch.ones(24, 1), None, bits)
    assert torch.equal(back, q)
