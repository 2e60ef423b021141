"""CPU kernels against the reference, over shapes that are not tile-aligned.

The error bound is derived in tests/kernels/cases.py.
"""

from __future__ import annotations

import pytest
import torch

from kernels import cpu, dispatch
from kernels import reference as R
from tests.kernels.cases import (
    assert_within_bound,
    magnitude,
    quantize,
    reference,
    script_cpu_clock,
    weights,
)

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
@pytest.mark.parametrize("K", [64, 192, 576])
@pytest.mark.parametrize("N", NS)
def test_group_wise_int8_matches_reference(N, K, g, dtype):
    prepared = _check("int8g", N, K, g, dtype, seed=N + K + g)
    assert cpu.path(prepared, 1) == "cpu-dense"  # dequantized per call: no fused op exists


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
@pytest.mark.parametrize("fmt", ["int8", "int8g", "int4", "nf4"])
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
    with pytest.raises(ValueError, match="valid: int8, int8g, int4, nf4"):
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


# --- batch-size dispatch: dequantize per call + fp32 GEMM for large M ----------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,N,K,g", [("int4", 960, 576, 64), ("int4", 64, 1536, 128),
                                       ("int4", 96, 192, 32), ("int8", 200, 576, 0)])
def test_dense_path_matches_reference(fmt, N, K, g, dtype):
    t = quantize(fmt, weights(N, K, N + K), g)
    prepare, linear = dispatch.get_kernels(fmt, "cpu")
    prepared = prepare(t, K=K, group_size=g, act_dtype=dtype)
    assert prepared["dense_from"] is None  # NIBBLE_TUNE=0: nothing measured, fused only
    prepared["dense_from"] = 3
    A = magnitude(fmt, t, K, g)
    x_all = torch.randn(64, K, generator=torch.Generator().manual_seed(N)).to(dtype)
    for M in MS:
        assert dispatch.path_label("cpu", prepared, M) == ("cpu-fused" if M < 3 else "cpu-dense")
        x = x_all[:M]
        y = linear(x, prepared)
        assert y.dtype == dtype and y.shape == (M, N)
        assert_within_bound(y, reference(fmt, x, t, g), x, A)


def test_int4_packed_layout_decodes_to_the_codes():
    t = quantize("int4", weights(96, 256, 5), 64)
    prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256)
    codes = R.unpack_nibbles(t["qweight"], 256).to(torch.int32)
    assert torch.equal(cpu._int4_codes_t(prepared["packed"]), codes.T)


def test_dense_crossover_is_measured_once_per_shape(monkeypatch, caplog):
    """A scripted clock: dense is faster from M=128 up, so calls of 128 rows and more take it;
    batch_invariant and NIBBLE_TUNE=0 keep the fused op."""
    timed, _ = script_cpu_clock(monkeypatch, "_dense_rows", lambda M: M >= 128)
    t = quantize("int4", weights(64, 256, 1), 64)
    with caplog.at_level("INFO", logger="nibble.kernels"):
        prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256)
    assert prepared["dense_from"] == 128
    # largest first, stopping at the first M where the fused op wins
    assert timed == [(512, True), (512, False), (256, True), (256, False), (128, True),
                     (128, False), (64, True), (64, False)]
    assert "dequantize + fp32 GEMM from M 128" in caplog.text
    assert [cpu.path(prepared, m) for m in (1, 127, 128, 512)] == \
        ["cpu-fused", "cpu-fused", "cpu-dense", "cpu-dense"]
    timed.clear()
    again = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256)
    assert again["dense_from"] == 128 and not timed  # same shape: not measured again
    pinned = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256,
                              batch_invariant=True)
    assert pinned["dense_from"] is None
    monkeypatch.setenv("NIBBLE_TUNE", "0")
    assert cpu.int8_prepare(t["qweight"].view(torch.int8)[:, :128].contiguous(),
                            torch.ones(64))["dense_from"] is None


def _fp16_gemm_wins(monkeypatch):
    """A scripted clock on which fbgemm's fp16 GEMM beats F.linear."""
    script_cpu_clock(monkeypatch, "fp16_gemm", lambda M: True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_through_the_fp16_gemm_matches_reference(monkeypatch, dtype):
    _fp16_gemm_wins(monkeypatch)
    prepared = _check("nf4", 200, 576, 64, dtype, seed=3)
    if dtype == torch.float32:  # fp32 weights stay with F.linear (fp16 would round them)
        assert "fp16_gemm" not in prepared
        return
    assert prepared["fp16_gemm"] is not None and prepared["weight"] is None
    pinned = cpu.nf4_prepare(*[quantize("nf4", weights(200, 576, 3), 64)[k]
                               for k in ("qweight", "absmax")], 64, 576, dtype,
                             batch_invariant=True)
    assert pinned["weight"] is not None and "fp16_gemm" not in pinned


def test_bf16_layers_take_the_fp16_gemm_where_it_wins(monkeypatch):
    """engine/quant/fp.py: an untied 16-bit layer lets its weight go for the packed copy; a
    tied lm_head keeps the shared weight and counts the copy as extra bytes."""
    from engine.config import QuantSpec
    from engine.quant.fp import FloatMethod

    _fp16_gemm_wins(monkeypatch)
    w = weights(96, 192, 4).to(torch.bfloat16)
    x = torch.randn(5, 192).to(torch.bfloat16)
    want = x.float() @ w.float().T
    for shared in (False, True):
        m = FloatMethod(QuantSpec("bf16"), 192, 96, torch.bfloat16)
        m.load({"weight": w})
        m.shared = shared
        m.prepare(torch.device("cpu"))
        assert m._fp16_gemm is not None
        assert (m.weight is not None) is shared
        assert m.extra_bytes == (96 * 192 * 2 if shared else 0)
        y = m.apply(x, None)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), want, rtol=2**-7, atol=1e-3)
