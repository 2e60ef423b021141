"""Plain-torch dequantize, matmul and quantize for every storage format: the oracle.

Every fast kernel (kernels/cpu.py, kernels/triton/) is tested against these functions, so they
favour obviousness over speed: unpack everything, dequantize to float32, matmul in float32.

Storage formats (weights are [N, K] = [out_features, in_features], y = x @ W.T):

- int8  (per output channel, symmetric): qweight int8 [N, K], scales float32 [N].
        W = qweight * scales[:, None]
- int8g (group-wise along K, asymmetric): qweight uint8 [N, K], scales and zeros float32
        [N, G].  W[n, k] = (q[n, k] - 128) * scales[n, k//g] + zeros[n, k//g]
        (int4's formula with 8-bit codes: GGUF Q8_0 and 8-bit GPTQ map onto it exactly)
- int4  (group-wise along K, group size g): qweight uint8 [N, ceil(K/2)] (two codes per byte,
        element 2j in the low nibble, 2j+1 in the high one), scales and zeros float32 [N, G],
        G = ceil(K/g).  W[n, k] = (q[n, k] - 8) * scales[n, k//g] + zeros[n, k//g]
- nf4   (group-wise absmax): qweight uint8 [N, ceil(K/2)] packed as int4, absmax float32 [N, G].
        W[n, k] = NF4_CODEBOOK[q[n, k]] * absmax[n, k//g]
- w8a8  (int8 weights and int8 activations): the weights as int8; optionally input_scale
        float32 [1], a calibrated per-tensor activation scale ("static"). Each call rounds the
        activations to int8 (quantize_activations: per row, or by input_scale), sums the
        int8 x int8 products exactly (as int32) and scales the sums: see w8a8_linear.

The last group may be ragged (K = 576, g = 128 gives groups 128, 128, 128, 128, 64); every
function here accepts that. A group whose range is zero gets scale 0 (never a NaN): its
dequantized values are then exactly its constant value.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# The 16 NormalFloat4 levels of QLoRA as bitsandbytes hard-codes them (csrc/kernels.cu,
# `nf4_dequantization_lut`): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 at code 7.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


@functools.lru_cache(maxsize=8)
def _codebook_on(device: torch.device) -> Tensor:
    """NF4_CODEBOOK on `device`, copied once per device rather than once per call."""
    return NF4_CODEBOOK.to(device)


# ---------------------------------------------------------------------------------------------
# Packing and group expansion
# ---------------------------------------------------------------------------------------------


def pack_nibbles(q: Tensor) -> Tensor:
    """Pack 4-bit codes two per byte.

    q: uint8 [N, K], values 0..15.  Returns uint8 [N, ceil(K/2)]: element 2j in the low nibble,
    2j+1 in the high nibble; for odd K the last high nibble is 0.
    """
    if q.dtype != torch.uint8:
        raise TypeError(f"pack_nibbles expects uint8 codes, got {q.dtype}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"pack_nibbles expects codes 0..15, found {int(q.max())}")
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: Tensor, K: int) -> Tensor:
    """Inverse of pack_nibbles. p: uint8 [N, ceil(K/2)] -> uint8 [N, K] codes 0..15."""
    if p.shape[1] != (K + 1) // 2:
        raise ValueError(
            f"packed width {p.shape[1]} does not match K={K} (expected {(K + 1) // 2})"
        )
    q = torch.stack([p & 0x0F, p >> 4], dim=-1).reshape(p.shape[0], -1)
    return q[:, :K].contiguous()


def num_groups(K: int, group_size: int) -> int:
    """G = ceil(K / group_size): the number of groups along K, the last one possibly ragged."""
    return -(-K // group_size)


def expand_groups(t: Tensor, K: int, group_size: int) -> Tensor:
    """Repeat per-group values along K. t: [N, G] -> [N, K], with out[n, k] = t[n, k // g]."""
    if t.shape[1] != num_groups(K, group_size):
        raise ValueError(
            f"{t.shape[1]} groups given, but K={K} with group size {group_size} needs "
            f"{num_groups(K, group_size)}"
        )
    return t.repeat_interleave(group_size, dim=1)[:, :K]


# ---------------------------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------------------------


def dequantize_int8(qweight: Tensor, scales: Tensor) -> Tensor:
    """qweight int8 [N, K], scales [N] -> float32 [N, K]."""
    return qweight.float() * scales.float()[:, None]


def dequantize_int4(
    qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, K: int
) -> Tensor:
    """qweight uint8 [N, ceil(K/2)], scales/zeros [N, G] -> float32 [N, K]."""
    q = unpack_nibbles(qweight, K).float()
    s = expand_groups(scales.float(), K, group_size)
    z = expand_groups(zeros.float(), K, group_size)
    return (q - 8.0) * s + z


def dequantize_int8g(
    qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, K: int
) -> Tensor:
    """qweight uint8 [N, K], scales/zeros [N, G] -> float32 [N, K]."""
    if qweight.shape[1] != K:
        raise ValueError(f"int8g qweight has {qweight.shape[1]} columns, expected K={K}")
    s = expand_groups(scales.float(), K, group_size)
    z = expand_groups(zeros.float(), K, group_size)
    return (qweight.float() - 128.0) * s + z


def dequantize_nf4(qweight: Tensor, absmax: Tensor, group_size: int, K: int) -> Tensor:
    """qweight uint8 [N, ceil(K/2)], absmax [N, G] -> float32 [N, K]."""
    codes = unpack_nibbles(qweight, K).long()
    values = _codebook_on(qweight.device)[codes]
    return values * expand_groups(absmax.float(), K, group_size)


# ---------------------------------------------------------------------------------------------
# Linear layers: y = x @ W.T + bias, computed in float32, returned in x's dtype
# ---------------------------------------------------------------------------------------------


def _linear_f32(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] any float dtype, w float32 [N, K] -> [..., N] in x.dtype."""
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] -> [..., N] in x.dtype; weights as in dequantize_int8."""
    return _linear_f32(x, dequantize_int8(qweight, scales), bias)


def int4_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None = None,
) -> Tensor:
    """x [..., K] -> [..., N] in x.dtype; weights as in dequantize_int4 with K = x.shape[-1]."""
    w = dequantize_int4(qweight, scales, zeros, group_size, x.shape[-1])
    return _linear_f32(x, w, bias)


def int8g_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 bias: Tensor | None = None) -> Tensor:
    """x [..., K] -> [..., N] in x.dtype; weights as in dequantize_int8g with K = x.shape[-1]."""
    return _linear_f32(x, dequantize_int8g(qweight, scales, zeros, group_size, x.shape[-1]), bias)


def nf4_linear(
    x: Tensor, qweight: Tensor, absmax: Tensor, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """x [..., K] -> [..., N] in x.dtype; weights as in dequantize_nf4 with K = x.shape[-1]."""
    return _linear_f32(x, dequantize_nf4(qweight, absmax, group_size, x.shape[-1]), bias)


def quantize_activations(x: Tensor, input_scale: Tensor | None = None,
                         as_int8: bool = True) -> tuple[Tensor, Tensor]:
    """x [M, K] any float dtype -> (int8 [M, K], scales float32 [M]), symmetric: per row
    (token), scale = absmax / 127 ("dynamic"), or the calibrated per-tensor `input_scale` for
    every row ("static"). q = clamp(round(x * (1 / scale)), -127, 127) in float32 (round half
    to even); a zero scale gives codes 0. as_int8=False: the codes as the float32 integers."""
    xf = x.float()
    if input_scale is None:
        s = xf.abs().amax(dim=1) / 127.0
    else:
        s = input_scale.float().reshape(1).expand(x.shape[0]).contiguous()
    q = torch.round(xf * _safe_reciprocal(s)[:, None]).clamp_(-127, 127)
    return (q.to(torch.int8) if as_int8 else q), s


def w8a8_linear(x: Tensor, qweight: Tensor, scales: Tensor, input_scale: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
    """x [..., K] -> [..., N] in x.dtype. The activations are rounded by quantize_activations,
    the int8 x int8 products summed exactly (acc, as an int32 would hold them), and
    y = float32(acc) * sx[m] * scales[n] (+ bias), in float32 in that order, then x's dtype."""
    K = x.shape[-1]
    xq, sx = quantize_activations(x.reshape(-1, K), input_scale)
    acc = xq.double() @ qweight.double().T  # exact: |acc| <= 127 * 127 * K < 2**53
    y = acc.float() * sx[:, None] * scales.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


# ---------------------------------------------------------------------------------------------
# Quantizers (round to nearest; the formats' definitions)
# ---------------------------------------------------------------------------------------------


def _safe_reciprocal(t: Tensor) -> Tensor:
    """1 / t where t > 0, else 0: a zero scale maps every value of its group to code offset 0."""
    return torch.where(t > 0, 1.0 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """float32 [N, K] -> [N, G, g]. A ragged last group is padded by repeating its last
    column, which leaves that group's min, max and absmax unchanged."""
    N, K = w.shape
    pad = num_groups(K, group_size) * group_size - K
    if pad:
        w = torch.cat([w, w[:, -1:].expand(N, pad)], dim=1)
    return w.view(N, -1, group_size)


def _ungrouped(q: Tensor, K: int) -> Tensor:
    """[N, G, g] -> [N, K], dropping the padding _grouped added."""
    return q.reshape(q.shape[0], -1)[:, :K]


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] any float dtype -> (qweight int8 [N, K], scales float32 [N]).

    scales = absmax / 127 per row; an all-zero row gets scale 0 and codes 0.
    """
    wf = w.float()
    scales = wf.abs().amax(dim=1) / 127.0
    q = torch.round(wf * _safe_reciprocal(scales)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scales


def quantize_int4(
    w: Tensor, group_size: int, symmetric: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] any float dtype -> (qweight uint8 [N, ceil(K/2)], scales, zeros float32 [N, G]).

    Asymmetric: scale = (max - min) / 15, q = round((w - min) / scale), zeros = min + 8 * scale,
    so (q - 8) * scale + zeros = min + q * scale.  Symmetric: scale = absmax / 7,
    q = round(w / scale) + 8, zeros = 0.  Codes are clamped to 0..15.
    """
    K = w.shape[1]
    wg = _grouped(w.float(), group_size)  # [N, G, g]
    if symmetric:
        scales = wg.abs().amax(dim=2) / 7.0  # [N, G]
        zeros = torch.zeros_like(scales)
        q = torch.round(wg * _safe_reciprocal(scales)[..., None]) + 8.0
    else:
        lo, hi = wg.amin(dim=2), wg.amax(dim=2)
        scales = (hi - lo) / 15.0
        zeros = lo + 8.0 * scales
        q = torch.round((wg - lo[..., None]) * _safe_reciprocal(scales)[..., None])
    q = q.clamp_(0, 15).to(torch.uint8)
    return pack_nibbles(_ungrouped(q, K)), scales, zeros


def quantize_int8g(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] any float dtype -> (qweight uint8 [N, K], scales, zeros float32 [N, G]).

    scale = (max - min) / 255, q = round((w - min) / scale), zeros = min + 128 * scale, so
    (q - 128) * scale + zeros = min + q * scale.  Codes are clamped to 0..255.
    """
    K = w.shape[1]
    wg = _grouped(w.float(), group_size)  # [N, G, g]
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    scales = (hi - lo) / 255.0
    q = torch.round((wg - lo[..., None]) * _safe_reciprocal(scales)[..., None])
    q = q.clamp_(0, 255).to(torch.uint8)
    return _ungrouped(q, K).contiguous(), scales, lo + 128.0 * scales


def quantize_nf4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """w [N, K] any float dtype -> (qweight uint8 [N, ceil(K/2)], absmax float32 [N, G]).

    Each value is divided by its group's absmax and mapped to the nearest NF4_CODEBOOK entry.
    """
    K = w.shape[1]
    wg = _grouped(w.float(), group_size)  # [N, G, g]
    absmax = wg.abs().amax(dim=2)  # [N, G]
    normed = wg * _safe_reciprocal(absmax)[..., None]  # in [-1, 1]
    book = _codebook_on(w.device)
    # Nearest entry = number of midpoints below the value (the book is sorted ascending).
    midpoints = (book[1:] + book[:-1]) / 2
    q = torch.bucketize(normed, midpoints).to(torch.uint8)
    return pack_nibbles(_ungrouped(q, K)), absmax
