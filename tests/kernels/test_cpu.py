"""CPU kernels against the reference, over shapes that are not tile-aligned.

The error bound is derived in tests/kernels/cases.py.
"""

from __future__ import annotations

import pytest
import torch

from kernels import cpu, dispatch
from kernels import reference as R
from tests.kernels.cases import assert_within_bound, magnitude, quantize, reference, weights

DTYPES = [torch.bfloat16, torch.float32]
MS = [1, 3, 17, 64]
NS = [96, 200, 960]
KS = [64, 192, 576, 1536]
GROUPS = [32, 64, 128]


def _check(fmt: str, N: int, K: int, g: int, dtype: torch.dtype, seed: int):
    t = quantize(fmt, weights(N, K, seed), g)
    prepare, linear = dispatch.get_kernels(fmt, "cpu")
    prepared = prepare(t, K=K, group_size=g, act_dtype=dtype)
    A = magnitude(fmt, t, K, g)
    x_all = torch.randn(max(MS), K, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for M in MS:
        x = x_all[:M]
        y = linear(x, prepared)
        assert y.dtype == dtype and y.shape == (M, N)
        assert_within_bound(y, reference(fmt, x, t, g), x, A)
    return prepared


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_int4_matchesreference(N, K, g, dtype):
    prepared = _check("int4", N, K, g, dtype, seed=N + K + g)
    # Every shape here is served by the fused op; ragged groups shrink the kernel group.
    assert not cpu.is_dense(prepared)
    assert prepared["group_size"] == min(g, K & -K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_int8_matchesreference(N, K, dtype):
    assert not cpu.is_dense(_check("int8", N, K, 0, dtype, seed=N + K))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_nf4_matchesreference(N, K, g, dtype):
    _check("nf4", N, K, g, dtype, seed=N + K + g)


@pytest.mark.parametrize(
    "fmt,K,dense",
    [
        ("int4", 48, True),  # gcd(48, 32) = 16: no kernel group size; dequantized
        ("int4", 63, True),  # odd K
        ("int4", 96, False),  # kernel group 32
        ("int8", 72, True),  # bf16 with K % 16 != 0 crashes the op; dequantized
        ("int8", 63, True),
    ],
)
def test_unserved_shapes_fall_back_correctly(fmt, K, dense):
    prepared = _check(fmt, 40, K, 32, torch.bfloat16, seed=K)
    assert cpu.is_dense(prepared) is dense


def test_int8_fp32_serves_any_k():
    assert not cpu.is_dense(_check("int8", 40, 72, 0, torch.float32, seed=1))


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_fp16_activations(fmt):
    _check(fmt, 96, 192, 64, torch.float16, seed=3)


def test_int4_pads_n_to_16():
    t = quantize("int4", weights(200, 64, 0), 32)
    prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 32, 64)
    assert prepared["packed"].shape[0] == 208 and prepared["N"] == 200


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_leading_dims_and_bias(fmt, dtype):
    K, N, g = 192, 96, 64
    t = quantize(fmt, weights(N, K, 7), g)
    prepare, linear = dispatch.get_kernels(fmt, "cpu")
    prepared = prepare(t, K=K, group_size=g, act_dtype=dtype)
    x = torch.randn(2, 5, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    y = linear(x, prepared, bias)
    assert y.shape == (2, 5, N) and y.dtype == dtype
    assert_within_bound(y, reference(fmt, x, t, g, bias), x, magnitude(fmt, t, K, g), bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "fmt,K,g",
    [("int8", 576, 0), ("int4", 576, 128), ("nf4", 576, 128), ("int4", 48, 32), ("int8", 72, 0)],
)
def test_row_does_not_depend_on_batch(fmt, K, g, dtype):
    t = quantize(fmt, weights(200, K, 11), g)
    prepare, linear = dispatch.get_kernels(fmt, "cpu")
    prepared = prepare(t, K=K, group_size=g, act_dtype=dtype)
    x = torch.randn(17, K).to(dtype)
    alone, batched = linear(x[:1], prepared), linear(x, prepared)[:1]
    if cpu.is_dense(prepared) and dtype == torch.float32:
        # MKL's fp32 gemv (M=1) and gemm sum in different orders; bf16 and the fused ops don't.
        torch.testing.assert_close(alone, batched, rtol=K * 2.0**-23, atol=1e-6)
    else:
        assert torch.equal(alone, batched)


def test_wrong_activation_dtype_says_how_to_fix():
    t = quantize("int4", weights(96, 64, 0), 32)
    prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 32, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="act_dtype=torch.float32"):
        cpu.int4_linear(torch.randn(1, 64), prepared)


def test_dispatch_backends_and_errors():
    assert dispatch.backend_for("cpu") == "cpu"
    want = "triton" if dispatch.triton_available() else "reference"
    assert dispatch.backend_for(torch.device("cuda", 0)) == want
    with pytest.raises(ValueError, match="valid: int8, int4, nf4"):
        dispatch.get_kernels("int3", "cpu")
    with pytest.raises(ValueError, match="group_size"):
        dispatch.get_kernels("int4", "cpu")[0]({}, K=64, group_size=None, act_dtype=torch.float32)


def test_int8_misaligned_weight_is_served():
    """Tensors read from safetensors sit at 8-byte offsets; the op crashed on them for M > 1."""
    w = torch.randn(96, 576)
    q, s = R.quantize_int8(w)
    buf = torch.empty(q.numel() + 8, dtype=torch.int8)
    shifted = buf[8:].view(q.shape)
    shifted.copy_(q)
    assert shifted.data_ptr() % 64
    prepared = cpu.int8_prepare(shifted, s, torch.bfloat16)
    x = torch.randn(5, 576, dtype=torch.bfloat16)
    ref = R.int8_linear(x.float(), q, s)
    assert (cpu.int8_linear(x, prepared).float() - ref).abs().max() <= 0.02 * ref.abs().max()
