"""The oracle itself: formats, packing, ragged groups and quantizer error bounds."""

from __future__ import annotations

import pytest
import torch

from kernels import reference as R

# fp32 slack for bounds that hold exactly in real arithmetic: computing scale, zero and the
# dequantized value costs a few roundings, each at most 2**-24 of the group's magnitude.
FP32_SLACK = 2.0**-20


def _weights(N: int, K: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights whose rows differ in scale, with an all-zero row and a constant run."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 0.1
    w[0] = 0.0
    w[1, : min(K, 40)] = 0.25
    return w


def test_nf4_codebook_is_bitsandbytes_table():
    book = R.NF4_CODEBOOK
    assert book.dtype == torch.float32 and book.shape == (16,)
    assert torch.all(book[1:] > book[:-1])
    assert book[0] == -1.0 and book[7] == 0.0 and book[15] == 1.0
    # Two interior entries, as printed in bitsandbytes' kernels.cu.
    assert book[1].item() == pytest.approx(-0.6961928009986877, abs=1e-9)
    assert book[8].item() == pytest.approx(0.07958029955625534, abs=1e-9)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert R.pack_nibbles(q).tolist() == [[0x21, 0x03]]


@pytest.mark.parametrize("K", [1, 2, 7, 64, 65, 576])
def test_pack_unpack_round_trip(K):
    q = torch.randint(0, 16, (5, K), dtype=torch.uint8)
    p = R.pack_nibbles(q)
    assert p.shape == (5, (K + 1) // 2) and p.dtype == torch.uint8
    assert torch.equal(R.unpack_nibbles(p, K), q)


def test_pack_rejects_codes_above_15():
    with pytest.raises(ValueError, match="0..15"):
        R.pack_nibbles(torch.tensor([[16]], dtype=torch.uint8))


def test_expand_groups_ragged_last_group():
    t = torch.arange(10, dtype=torch.float32).view(2, 5)  # K=576, g=128 -> 128*4 + 64
    out = R.expand_groups(t, 576, 128)
    assert out.shape == (2, 576)
    assert torch.equal(out[:, 511], t[:, 3]) and torch.equal(out[:, 512], t[:, 4])
    assert torch.equal(out[:, 575], t[:, 4])
    with pytest.raises(ValueError, match="needs 5"):
        R.expand_groups(t[:, :4], 576, 128)


def test_dequantize_int4_by_hand():
    # K=3, g=2: groups {0, 1} and the ragged {2}; codes 0, 15, 8.
    qweight = R.pack_nibbles(torch.tensor([[0, 15, 8]], dtype=torch.uint8))
    scales, zeros = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    w = R.dequantize_int4(qweight, scales, zeros, 2, 3)
    assert w.tolist() == [[-7.5, 7.5, -1.0]]


def test_dequantize_nf4_by_hand():
    qweight = R.pack_nibbles(torch.tensor([[0, 7, 15]], dtype=torch.uint8))
    w = R.dequantize_nf4(qweight, torch.tensor([[2.0, 3.0]]), 2, 3)
    assert w.tolist() == [[-2.0, 0.0, 3.0]]


def test_dequantize_int8_by_hand():
    w = R.dequantize_int8(torch.tensor([[-127, 3]], dtype=torch.int8), torch.tensor([0.5]))
    assert w.tolist() == [[-63.5, 1.5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_int8_error_within_half_scale(dtype):
    w = _weights(33, 100).to(dtype)
    qweight, scales = R.quantize_int8(w)
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (33,)
    assert int(qweight.abs().max()) == 127
    err = (R.dequantize_int8(qweight, scales) - w.float()).abs()
    bound = scales[:, None] / 2 + FP32_SLACK * w.float().abs().amax(1, keepdim=True)
    assert torch.all(err <= bound)
    assert torch.all(R.dequantize_int8(qweight, scales)[0] == 0)  # the zero row


def _group_bound(scales: torch.Tensor, w: torch.Tensor, K: int, g: int) -> torch.Tensor:
    """Per element: half its group's scale plus fp32 slack on the group's magnitude."""
    mag = torch.nn.functional.pad(w.abs(), (0, -K % g)).view(w.shape[0], -1, g).amax(2)
    return R.expand_groups(scales / 2 + FP32_SLACK * mag, K, g)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("K,g", [(576, 128), (576, 32), (200, 64), (63, 32), (64, 128)])
def test_quantize_int4_error_within_half_scale(K, g, symmetric):
    w = _weights(24, K)
    qweight, scales, zeros = R.quantize_int4(w, g, symmetric=symmetric)
    G = -(-K // g)
    assert qweight.shape == (24, (K + 1) // 2) and scales.shape == zeros.shape == (24, G)
    if symmetric:
        assert torch.all(zeros == 0)
    deq = R.dequantize_int4(qweight, scales, zeros, g, K)
    assert torch.all((deq - w).abs() <= _group_bound(scales, w, K, g))
    assert torch.all(deq[0] == 0)  # zero row: scale 0, exact


def test_quantize_int4_constant_group_is_exact():
    # Asymmetric: zero range -> scale 0, zeros = the constant, no NaN from dividing by 0.
    w = torch.full((2, 64), 0.3)
    qweight, scales, zeros = R.quantize_int4(w, 32)
    assert torch.all(scales == 0)
    assert torch.equal(R.dequantize_int4(qweight, scales, zeros, 32, 64), w)


def test_quantize_int4_uses_the_full_code_range():
    qweight, _, _ = R.quantize_int4(_weights(8, 128, seed=1)[2:], 64)
    codes = R.unpack_nibbles(qweight, 128)
    assert int(codes.min()) == 0 and int(codes.max()) == 15


@pytest.mark.parametrize("K,g", [(576, 64), (576, 128), (200, 32), (63, 32)])
def test_quantize_nf4_picks_nearest_code(K, g):
    w = _weights(16, K)
    qweight, absmax = R.quantize_nf4(w, g)
    assert qweight.shape == (16, (K + 1) // 2) and absmax.shape == (16, -(-K // g))
    deq = R.dequantize_nf4(qweight, absmax, g, K)
    scale = R.expand_groups(absmax, K, g)
    book = R.NF4_CODEBOOK
    err = (deq - w).abs()
    # Bound from the brief: half the largest code book gap, times the group's absmax.
    half_gap = (book[1:] - book[:-1]).max() / 2
    assert torch.all(err <= half_gap * scale + FP32_SLACK * scale)
    # Stronger: no other code would have been closer.
    best = (book[None, None, :] * scale[..., None] - w[..., None]).abs().amin(-1)
    assert torch.all(err <= best + FP32_SLACK * scale)
    assert torch.all(deq[0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linears_match_dequantize_then_matmul(dtype):
    torch.manual_seed(0)
    K, N, g = 192, 40, 64
    w = _weights(N, K)
    x = torch.randn(2, 3, K).to(dtype)
    bias = torch.randn(N)
    q8, s8 = R.quantize_int8(w)
    q4, s4, z4 = R.quantize_int4(w, g)
    qn, an = R.quantize_nf4(w, g)
    cases = [
        (R.int8_linear(x, q8, s8, bias), R.dequantize_int8(q8, s8)),
        (R.int4_linear(x, q4, s4, z4, g, bias), R.dequantize_int4(q4, s4, z4, g, K)),
        (R.nf4_linear(x, qn, an, g, bias), R.dequantize_nf4(qn, an, g, K)),
    ]
    for y, deq in cases:
        assert y.dtype == dtype and y.shape == (2, 3, N)
        assert torch.equal(y, (x.float() @ deq.T + bias).to(dtype))
