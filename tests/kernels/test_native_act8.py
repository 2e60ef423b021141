"""The native kernels' 8-bit activation paths, which the fused CPU decode step uses with
decode_activations="int8": int4 weights (kernels/csrc/int4_cpu.cpp) and an int8 lm_head
(kernels/csrc/int8_cpu.cpp).

Each row of x is quantized per block of 32: a = max|x| / 127, x_q = round(x / a) (to nearest,
ties to even). The kernel then computes W @ (a * x_q) with exact integer dot products, so
against a reference that does the same quantization in PyTorch it is held to the fp32
rounding bound of tests/kernels/cases.py. Against the unquantized x, the difference is
W @ (x - a * x_q) with |x - a * x_q| <= a / 2 per value: that bound (plus the same rounding
slack) is checked too, and a wrong block scale or byte order breaks both by orders of
magnitude.
"""

from __future__ import annotations

import pytest
import torch

from kernels import cpu, native
from kernels import reference as R
from tests.kernels.cases import assert_within_bound, magnitude, quantize, weights

pytestmark = pytest.mark.skipif(
    native.load() is None, reason=f"no native kernels: {native.supported() or 'build failed'}")

BLOCK = 32


def quantized_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (a * x_q, a per value): the kernel's quantization, done in PyTorch."""
    M, K = x.shape
    blocks = x.view(M, K // BLOCK, BLOCK)
    top = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, torch.tensor(127.0) / top, torch.zeros_like(top))
    q = torch.round(blocks * inv)
    a = top / 127.0
    return (q * a).view(M, K), a.expand(-1, -1, BLOCK).reshape(M, K)


def run(prepared: cpu.Int4Native, x: torch.Tensor, act8: bool) -> torch.Tensor:
    return native.load().int4_linear(x, prepared.native, prepared.scale, prepared.bias,
                                     prepared.group_size, prepared.N, act8)


def prepare(N: int, K: int, g: int, seed: int):
    t = quantize("int4", weights(N, K, seed), g)
    prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], g, K, torch.float32,
                                native=True)
    assert isinstance(prepared, cpu.Int4Native)
    w = R.dequantize_int4(t["qweight"], t["scales"], t["zeros"], g, K).double()
    return t, prepared, w


@pytest.mark.parametrize("M", [1, 3, 4, 17])
@pytest.mark.parametrize(("N", "K", "g"), [(96, 64, 32), (200, 576, 64), (960, 576, 32),
                                           (576, 1536, 128)])
def test_int8_activations_compute_w_times_the_quantized_rows(N, K, g, M):
    t, prepared, w = prepare(N, K, g, seed=N + K + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
    x[:, 5] *= 40  # an outlier channel: its block gets a coarse scale, the others do not
    xq, a = quantized_rows(x)
    y = run(prepared, x, act8=True)
    A = magnitude("int4", t, K, g, offsets=True)  # the kernel computes q * s + (z - 8s)
    assert_within_bound(y, (xq.double() @ w.T).float(), xq, A, roundings=0)
    # against the exact x: the quantization error, at most a/2 per value, through |W|
    exact = (x.double() @ w.T).float()
    slack = (x.abs() @ A.T) * (2 * K * 2.0**-24) + 1e-6
    assert ((y - exact).abs() <= (a @ w.abs().T.float()) / 2 + slack).all()
    # and it is a real approximation: closer to the exact product than a wrong scale would be
    assert (y - exact).norm() < 0.05 * exact.norm()


def test_int8_rows_do_not_depend_on_the_batch():
    _, prepared, _ = prepare(960, 576, 64, seed=1)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(2))
    batched = run(prepared, x, act8=True)
    for i in range(9):
        assert torch.equal(run(prepared, x[i:i + 1], act8=True), batched[i:i + 1])


def test_shapes_without_whole_blocks_keep_fp32_activations():
    """K or the group not a multiple of 32 (prepare never builds these: its groups are 32 to
    256, but the kernel takes groups of 8 upwards): x stays unquantized."""
    g = torch.Generator().manual_seed(0)
    for N, K, group in [(96, 208, 16), (96, 256, 16), (96, 240, 8)]:
        words = torch.randint(-2**31, 2**31 - 1, (N // 8, K // 8, 8), dtype=torch.int32,
                              generator=g)
        scale = torch.rand(K // group, N, generator=g) * 0.02
        prepared = cpu.Int4Native(words, scale, -8 * scale, group, N, torch.float32)
        x = torch.randn(3, K, generator=g)
        assert torch.equal(run(prepared, x, act8=True), run(prepared, x, act8=False))


# --- int8 weights (kernels/csrc/int8_cpu.cpp): an int8 lm_head after a fused decode step ---


def run8(q: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return native.load().int8_linear_act8(x, q, s)


@pytest.mark.parametrize("M", [1, 3, 4, 9])
@pytest.mark.parametrize(("N", "K"), [(96, 64), (1000, 576)])
def test_int8_weights_compute_w_times_the_quantized_rows(N, K, M):
    t = quantize("int8", weights(N, K, seed=N + M), 0)
    q, s = t["qweight"], t["scales"].float().contiguous()
    w = R.dequantize_int8(q, s).double()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
    x[:, 7] *= 40
    xq, a = quantized_rows(x)
    y = run8(q, s, x)
    A = magnitude("int8", t, K, 0)
    assert_within_bound(y, (xq.double() @ w.T).float(), xq, A, roundings=0)
    exact = (x.double() @ w.T).float()
    slack = (x.abs() @ A.T) * (2 * K * 2.0**-24) + 1e-6
    assert ((y - exact).abs() <= (a @ w.abs().T.float()) / 2 + slack).all()


def test_int8_weight_rows_do_not_depend_on_the_batch():
    t = quantize("int8", weights(200, 576, seed=3), 0)
    q, s = t["qweight"], t["scales"].float().contiguous()
    x = torch.randn(7, 576, generator=torch.Generator().manual_seed(4))
    batched = run8(q, s, x)
    for i in range(7):
        assert torch.equal(run8(q, s, x[i:i + 1]), batched[i:i + 1])


def test_int8_kernel_refuses_what_it_cannot_compute():
    q = torch.zeros(16, 48, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        run8(q, torch.ones(16), torch.randn(1, 48))
    with pytest.raises(RuntimeError, match="float32"):
        run8(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16), torch.randn(1, 64).half())
