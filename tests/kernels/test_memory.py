"""The byte counts engine/plan.py estimates from shapes against the layouts prepare builds."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu, dispatch, formats, native
from tests.kernels.cases import quantize, weights

# ragged N (not a multiple of 8 or 16), K that groups of 128 do not divide, K % 16 != 0
SHAPES = [(96, 64), (100, 192), (24, 576), (40, 80)]
CASES = [("int4", 32), ("int4", 64), ("int4", 128), ("int8", None), ("int8g", 32), ("nf4", 64),
         ("nf4", 32)]


def _nbytes(tensors) -> int:
    return sum(v.numel() * v.element_size() for v in tensors if isinstance(v, torch.Tensor))


def _quantized(fmt: str, N: int, K: int, g: int | None):
    return quantize(fmt, weights(N, K, N + K), g or 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt,g", CASES)
@pytest.mark.parametrize("N,K", SHAPES)
def test_cpu_prepared_bytes_match_the_layouts(N, K, fmt, g, dtype, monkeypatch):
    t = _quantized(fmt, N, K, g)
    prepare, _ = dispatch.get_kernels(fmt, "cpu")
    prepared = prepare(t, K=K, group_size=g, act_dtype=dtype)
    record = formats.get(fmt)
    assert record.cpu_bytes(N, K, g, dtype) == _nbytes(prepared.tensors())
    if fmt == "int4" and native.load() is not None:  # PyTorch's op, where the native kernel runs
        monkeypatch.setenv("NIBBLE_NATIVE", "0")
        op = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], g, K, dtype, native=False)
        assert record.cpu_bytes(N, K, g, dtype) == _nbytes(op.tensors())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt,g", CASES)
@pytest.mark.parametrize("N,K", SHAPES)
def test_triton_layout_bytes_match_the_layouts(N, K, fmt, g, dtype):
    t = _quantized(fmt, N, K, g)
    lay = formats.get(fmt).triton_layout
    assert formats.get(fmt).triton_bytes(N, K, g, dtype) == _nbytes(lay.repack(t, K, g, dtype).values())


@pytest.mark.parametrize("fmt,g,N,K", [("int4", 64, 960, 576), ("int4", 32, 200, 64),
                                       ("int8", None, 200, 576), ("int8g", 32, 96, 80)])
def test_scratch_buffers_are_the_ones_the_dense_path_allocates(fmt, g, N, K, monkeypatch):
    """Where the dequantize-per-call path runs, the buffers it allocates are the ones counted."""
    monkeypatch.setattr(cpu, "_SCRATCH", {})
    monkeypatch.setattr(cpu, "_dense_expected", lambda key: True)
    t = _quantized(fmt, N, K, g)
    prepare, linear = dispatch.get_kernels(fmt, "cpu")
    prepared = prepare(t, K=K, group_size=g, act_dtype=torch.float32)
    prepared.dense_from = 1
    linear(torch.randn(4, K), prepared)
    allocated = sum(b.numel() * b.element_size() for b in cpu._SCRATCH.values())
    assert allocated > 0
    assert sum(formats.get(fmt).cpu_scratch(N, K, g, torch.float32).values()) == allocated


def test_fp16_gemm_copy_follows_the_stored_choice(monkeypatch, tmp_path):
    """The estimate assumes fbgemm's copy where a load would measure, and follows what this
    machine stored where it did."""
    monkeypatch.setenv("NIBBLE_TUNE", "1")
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "_MEASURED", {})
    assert cpu.fp16_gemm_expected(64, 32, torch.bfloat16)  # unknown: counted
    assert not cpu.fp16_gemm_expected(64, 32, torch.float32)  # fp32 weights are never packed
    cpu._MEASURED[cpu._key_text(("fp16-gemm", 32, 64, torch.bfloat16))] = (
        {"fbgemm": False, "gains_m1_m16": [1.0, 1.0]}, "cached")
    assert not cpu.fp16_gemm_expected(64, 32, torch.bfloat16)
    monkeypatch.setenv("NIBBLE_TUNE", "0")
    assert not cpu.fp16_gemm_expected(128, 32, torch.bfloat16)
