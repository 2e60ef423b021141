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

from collections.abc import Mapping

import torch
from torch import Tensor

from kernels import reference

FMT_INT8, FMT_INT4, FMT_NF4, FMT_INT8G = 0, 1, 2, 3
FORMAT_CODES = {"int8": FMT_INT8, "int4": FMT_INT4, "nf4": FMT_NF4, "int8g": FMT_INT8G}
CODE_OFFSET = {"int4": 8.0, "int8g": 128.0}  # the code of a zero-offset weight, per affine format


def _affine(scales: Tensor, zeros: Tensor, fmt: str, act_dtype: torch.dtype) -> dict[str, Tensor]:
    """Stored scales and zeros [N, G] -> K-major scales and offsets [G, N] in act_dtype; the
    offset is computed in float32 and rounded once."""
    scales, zeros = scales.float(), zeros.float()
    return {"scales": scales.T.to(act_dtype).contiguous(),
            "offsets": (zeros - CODE_OFFSET[fmt] * scales).T.to(act_dtype).contiguous()}


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


def repack(fmt: str, tensors: Mapping[str, Tensor], K: int, group_size: int | None,
           act_dtype: torch.dtype) -> dict[str, Tensor]:
    """Stored tensors (kernels/reference.py names) -> the tensors of the module docstring."""
    if fmt == "int8":
        return {"qweight": tensors["qweight"].T.contiguous(),
                "scales": tensors["scales"].float().contiguous()}
    if fmt == "int8g":
        return {"qweight": tensors["qweight"].T.contiguous(),
                **_affine(tensors["scales"], tensors["zeros"], fmt, act_dtype)}
    codes = reference.unpack_nibbles(tensors["qweight"], K)
    out = {"qweight": pack_k_major(codes)}
    if fmt == "int4":
        out.update(_affine(tensors["scales"], tensors["zeros"], fmt, act_dtype))
    elif fmt == "nf4":
        out["scales"] = tensors["absmax"].float().T.to(act_dtype).contiguous()
        out["codebook"] = reference.NF4_CODEBOOK.to(codes.device)
    else:
        raise ValueError(f"no Triton layout for format {fmt!r}")
    return out


def dequantize(fmt: str, t: Mapping[str, Tensor], K: int, group_size: int | None) -> Tensor:
    """The layout above back to float32 [N, K], for tests and debugging."""
    if fmt == "int8":
        return t["qweight"].T.float() * t["scales"][:, None]
    q = t["qweight"].T.long() if fmt == "int8g" else unpack_k_major(t["qweight"], K).long()
    s = reference.expand_groups(t["scales"].T.float(), K, group_size)
    if fmt in CODE_OFFSET:
        return q.float() * s + reference.expand_groups(t["offsets"].T.float(), K, group_size)
    return t["codebook"][q] * s


def layout_bytes(fmt: str, N: int, K: int, group_size: int | None, act_dtype: torch.dtype) -> int:
    """Bytes `repack` keeps for a [N, K] weight, from shapes alone (engine/plan.py's estimate;
    tested against real layouts)."""
    act = act_dtype.itemsize
    if fmt == "int8":
        return K * N + 4 * N
    G = -(-K // group_size)
    if fmt == "int8g":
        return K * N + 2 * G * N * act
    words = -(-K // 8) * N * 4
    if fmt == "int4":
        return words + 2 * G * N * act
    if fmt == "nf4":
        return words + G * N * act + reference.NF4_CODEBOOK.numel() * 4
    raise ValueError(f"no Triton layout for format {fmt!r}")
