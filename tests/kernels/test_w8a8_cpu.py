"""W8A8 on CPU (kernels/w8a8.py, kernels/csrc/w8a8_cpu.cpp) against kernels/reference.py: both
paths compute the reference's numbers bit for bit, over shapes that cross the native kernel's
row tiles (4) and K blocks (32)."""

from __future__ import annotations

import pytest
import torch

from engine.config import QuantSpec
from kernels import cpu, dispatch, formats, native, w8a8
from kernels import reference as R

needs_native = pytest.mark.skipif(native.load() is None, reason="native CPU kernels unavailable")


def _case(N: int, K: int, seed: int, static: bool):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    q, s = R.quantize_int8(w)
    t = {"qweight": q, "scales": s}
    if static:
        t["input_scale"] = torch.tensor([0.05])
    return t, g


def _x(M: int, K: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(M, K, generator=g) * 2
    x[:, 1] *= 40  # an outlier channel, as LLM activations have
    if M > 2:
        x[2] = 0  # a zero row: scale 0, codes 0
    return x.to(dtype)


def _reference(x, t, bias=None):
    return R.w8a8_linear(x, t["qweight"], t["scales"], t.get("input_scale"), bias)


@needs_native
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 96, 64), (3, 17, 40), (5, 100, 300), (9, 64, 576),
                                   (4, 33, 1536)])
def test_native_and_dense_paths_are_the_reference_bitwise(M, N, K, dtype, static):
    t, g = _case(N, K, M + N + K, static)
    prepared = w8a8.cpu_prepare(t, K=K, group_size=None, act_dtype=dtype)
    x, bias = _x(M, K, g, dtype), torch.randn(N, generator=g).to(dtype)
    want = _reference(x, t, bias)
    for dense_from, label in ((None, "cpu-native"), (1, "cpu-dense")):
        prepared.dense_from = dense_from
        assert prepared.path(M) == label
        y = cpu.linear(x, prepared, bias)
        assert y.dtype == dtype and torch.equal(y, want), label


@needs_native
def test_a_row_does_not_depend_on_its_batch():
    t, g = _case(40, 96, 1, False)
    prepared = w8a8.cpu_prepare(t, K=96, group_size=None, act_dtype=torch.bfloat16)
    x = _x(7, 96, g, torch.bfloat16)
    batch = cpu.linear(x, prepared)
    for m in range(7):
        assert torch.equal(cpu.linear(x[m:m + 1], prepared), batch[m:m + 1])


def test_without_native_kernels_the_dense_path_serves(monkeypatch):
    monkeypatch.setattr(native, "load", lambda: None)
    t, g = _case(24, 80, 2, True)
    prepared = w8a8.cpu_prepare(t, K=80, group_size=None, act_dtype=torch.float32)
    assert [prepared.path(M) for M in (1, 512)] == ["cpu-dense", "cpu-dense"]
    x = _x(6, 80, g, torch.float32)
    assert torch.equal(cpu.linear(x, prepared), _reference(x, t))


def test_dispatch_reference_backend_and_leading_dims():
    t, g = _case(20, 64, 3, False)
    prepare, linear = dispatch.get_kernels("w8a8", "reference")
    x = _x(6, 64, g, torch.float32).view(2, 3, 64)
    y = linear(x, prepare(t, K=64, group_size=None, act_dtype=torch.float32))
    assert y.shape == (2, 3, 20) and torch.equal(y, _reference(x, t))
    prepare, linear = dispatch.get_kernels("w8a8", "cpu")
    assert torch.equal(linear(x, prepare(t, K=64, group_size=None, act_dtype=torch.float32)), y)


@pytest.mark.parametrize("static", [False, True])
def test_memory_counts_are_the_layouts(static, monkeypatch):
    record = formats.get("w8a8")
    for N, K in ((96, 64), (100, 300)):
        t, _ = _case(N, K, 4, static)
        prepared = w8a8.cpu_prepare(t, K=K, group_size=None, act_dtype=torch.bfloat16)
        held = sum(v.numel() * v.element_size() for v in prepared.tensors())
        assert held == record.cpu_bytes(N, K, None, torch.bfloat16) + (4 if static else 0)
        monkeypatch.setattr(cpu, "_SCRATCH", {})
        prepared.dense_from = 1
        cpu.linear(torch.randn(3, K).bfloat16(), prepared)
        allocated = sum(b.numel() * b.element_size() for b in cpu._SCRATCH.values())
        monkeypatch.setattr(cpu, "_dense_expected", lambda key: True)
        assert sum(record.cpu_scratch(N, K, None, torch.bfloat16).values()) == allocated


def test_the_spelling_and_its_errors():
    spec = QuantSpec.parse("w8a8")
    assert (spec.format, str(spec), spec.group_size) == ("w8a8", "w8a8", None)
    with pytest.raises(Exception, match="unknown option 'g32'"):
        QuantSpec.parse("w8a8-g32")
    with pytest.raises(Exception, match="w8a8"):  # listed among the valid spellings
        QuantSpec.parse("w8a9")


@needs_native
def test_a_row_of_subnormal_scale_rounds_as_the_reference():
    """absmax / 127 below float32's smallest normal: the scale is clamped before 1 / s (as
    the reference does), so zeros stay code 0 instead of 0 * inf."""
    t, _ = _case(16, 64, 5, False)
    prepared = w8a8.cpu_prepare(t, K=64, group_size=None, act_dtype=torch.float32)
    x = torch.zeros(2, 64)
    x[0, ::3] = 1e-37
    x[1, 5] = -3e-38
    assert torch.equal(cpu.linear(x, prepared), _reference(x, t))
    assert torch.equal(prepared.dense(x), _reference(x, t))
