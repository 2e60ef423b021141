"""The weight layout the Triton kernels read, built once at load from the stored formats.

Plain torch, no Triton: repacking is tested on machines without it. The stored formats are
those of kernels/reference.py (weights [N, K], codes along K); the kernels walk K in the outer
loop and want N contiguous, so every tensor here is K-major (transposed):

- int4, nf4: ``qweight`` int32 [ceil(K/8), N]. Word (i, n) holds the codes of k = 8i .. 8i+7 of
  output column n, code k in bits 4*(k % 8) .. 4*(k % 8)+3 (k = 8i in the lowest nibble).
  A ragged tail of K is padded with code 0; the kernels mask x there, so it never counts.
- int4: ``scales`` and ``offsets`` [G, N] in the activation dtype, G = ceil(K/g), with
  W[n, k] = q * scales[k//g, n] + offsets[k//g, n], offsets = zeros - 8 * scales (one FMA per
  weight instead of a subtract and an FMA; computed in fp32, rounded once).
- nf4: ``scales`` [G, N] (the absmax) in the activation dtype and ``codebook`` float32 [16]:
  W[n, k] = codebook[q] * scales[k//g, n].
- int8: ``qweight`` int8 [K, N] and ``scales`` float32 [N], applied to the fp32 accumulator
  after the K loop (exact: q is an integer the 16-bit dtypes hold exactly).
- int8g: ``qweight`` uint8 [K, N], ``scales`` and ``offsets`` [G, N] in the activation dtype,
  W[n, k] = q * scales[k//g, n] + offsets[k//g, n], offsets = zeros - 128 * scales (as int4).

16-bit scales follow Marlin and llama.cpp: they are read on every call, and fp32 scales would
add 8 bytes per group (50% more traffic than the codes themselves at g = 32).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import reference

FMT_INT8, FMT_INT4, FMT_NF4, FMT_INT8G = 0, 1, 2, 3  # the kernels' FMT constexpr


@dataclass(frozen=True)
class TritonLayout:
    """One format's layout for kernels/triton/qgemm.py: the kernel's FMT code, the repack from
    the stored tensors, its inverse to float32 [N, K] (tests and debugging), and its bytes from
    shapes alone (engine/plan.py's estimate; tested against real layouts)."""

    code: int
    repack: Callable[[Mapping[str, Tensor], int, int | None, torch.dtype], dict[str, Tensor]]
    dequantize: Callable[[Mapping[str, Tensor], int, int | None], Tensor]
    nbytes: Callable[[int, int, int | None, torch.dtype], int]


def _affine(scales: Tensor, zeros: Tensor, code_offset: float,
            act_dtype: torch.dtype) -> dict[str, Tensor]:
    """Stored scales and zeros [N, G] -> K-major scales and offsets [G, N] in act_dtype, with
    offsets = zeros - code_offset * scales (code_offset: the code of a zero-offset weight);
    the offset is computed in float32 and rounded once."""
    scales, zeros = scales.float(), zeros.float()
    return {"scales": scales.T.to(act_dtype).contiguous(),
            "offsets": (zeros - code_offset * scales).T.to(act_dtype).contiguous()}


def _affine_dequantize(q: Tensor, t: Mapping[str, Tensor], K: int, group_size: int) -> Tensor:
    s = reference.expand_groups(t["scales"].T.float(), K, group_size)
    return q.float() * s + reference.expand_groups(t["offsets"].T.float(), K, group_size)


def pack_k_major(codes: Tensor) -> Tensor:
    """uint8 codes [N, K] (0..15) -> int32 [ceil(K/8), N], eight codes per word along K."""
    N, K = codes.shape
    pad = -K % 8
    if pad:
        codes = torch.cat([codes, codes.new_zeros(N, pad)], dim=1)
    nib = codes.to(torch.int64).view(N, -1, 8)  # [N, K8, 8]
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (nib << shifts).sum(dim=2)  # [N, K8], values < 2**32
    # Reinterpret as signed int32 (two's complement); the kernels mask with 0xF after shifting.
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.T.contiguous()


def unpack_k_major(words: Tensor, K: int) -> Tensor:
    """Inverse of pack_k_major: int32 [ceil(K/8), N] -> uint8 codes [N, K]."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    codes = (words.T[:, :, None] >> shifts) & 0xF  # [N, K8, 8]
    return codes.reshape(words.shape[1], -1)[:, :K].to(torch.uint8)


def _int8_repack(t: Mapping[str, Tensor], K: int, group_size: int | None,
                 act_dtype: torch.dtype) -> dict[str, Tensor]:
    return {"qweight": t["qweight"].T.contiguous(), "scales": t["scales"].float().contiguous()}


def _int8g_repack(t: Mapping[str, Tensor], K: int, group_size: int | None,
                  act_dtype: torch.dtype) -> dict[str, Tensor]:
    return {"qweight": t["qweight"].T.contiguous(),
            **_affine(t["scales"], t["zeros"], 128.0, act_dtype)}


def _int4_repack(t: Mapping[str, Tensor], K: int, group_size: int | None,
                 act_dtype: torch.dtype) -> dict[str, Tensor]:
    return {"qweight": pack_k_major(reference.unpack_nibbles(t["qweight"], K)),
            **_affine(t["scales"], t["zeros"], 8.0, act_dtype)}


def _nf4_repack(t: Mapping[str, Tensor], K: int, group_size: int | None,
                act_dtype: torch.dtype) -> dict[str, Tensor]:
    return {"qweight": pack_k_major(reference.unpack_nibbles(t["qweight"], K)),
            "scales": t["absmax"].float().T.to(act_dtype).contiguous(),
            "codebook": reference.NF4_CODEBOOK.to(t["qweight"].device)}


def _nibble_words(N: int, K: int) -> int:
    return -(-K // 8) * N * 4


INT8 = TritonLayout(
    FMT_INT8, _int8_repack,
    lambda t, K, g: t["qweight"].T.float() * t["scales"][:, None],
    lambda N, K, g, act: K * N + 4 * N)
INT8G = TritonLayout(
    FMT_INT8G, _int8g_repack,
    lambda t, K, g: _affine_dequantize(t["qweight"].T.long(), t, K, g),
    lambda N, K, g, act: K * N + 2 * -(-K // g) * N * act.itemsize)
INT4 = TritonLayout(
    FMT_INT4, _int4_repack,
    lambda t, K, g: _affine_dequantize(unpack_k_major(t["qweight"], K).long(), t, K, g),
    lambda N, K, g, act: _nibble_words(N, K) + 2 * -(-K // g) * N * act.itemsize)
NF4 = TritonLayout(
    FMT_NF4, _nf4_repack,
    lambda t, K, g: t["codebook"][unpack_k_major(t["qweight"], K).long()]
    * reference.expand_groups(t["scales"].T.float(), K, g),
    lambda N, K, g, act: _nibble_words(N, K) + -(-K // g) * N * act.itemsize
    + reference.NF4_CODEBOOK.numel() * 4)
