"""CPU kernels: PyTorch's fused low-bit ops, with a one-time prepare per format.

Each format has `<fmt>_prepare(...)`, run once at load, which repacks the stored tensors
(kernels/reference.py describes the formats) into a `Prepared` dict, and `<fmt>_linear(x,
prepared, bias)`, which only launches kernels.  x is [..., K] in the activation dtype given
to prepare; the output is [..., N] in that dtype.

Op constraints (torch 2.13 CPU, probed on AVX512 and checked by tests/kernels/test_cpu.py):

- `aten._weight_int4pack_mm_for_cpu(x [M, K], packed, qGroupSize, scales_and_zeros)`:
  W = (q - 8) * scale + zero.  qGroupSize in {32, 64, 128, 256}, K % qGroupSize == 0,
  N % 16 == 0 (checked by `_convert_weight_to_int4pack_for_cpu`), x contiguous,
  scales_and_zeros [K / qGroupSize, N, 2] in x's dtype; bf16, fp16 and fp32 all work.  It
  accumulates in fp32 and rounds once (bf16 output equals the fp32 result rounded), and a row's
  output is bitwise the same whatever the batch.  innerKTiles is ignored by the CPU packer
  (1, 2, 4 and 8 give identical bytes).
- `aten._weight_int8pack_mm(x [M, K], qweight int8 [N, K], scales [N])`: scales in x's dtype.
  With bf16 x it needs K % 16 == 0: otherwise it returns garbage (M = 1) or segfaults
  (M > 1).  fp16 and fp32 work for any K.  Bitwise batch invariant.

How shapes the ops cannot serve are handled (decided at prepare, never per call):

- int4 ragged groups: the kernel group becomes kg = gcd(K, g) and each scale/zero column is
  repeated g/kg times (the ragged last group covers a whole number of kernel groups since
  kg | K), so the dequantized values are identical.  N % 16 != 0: rows are padded with zero
  scales and zeros and the output is sliced.  kg < 32 (K % 32 != 0, odd K included): dense.
- int8 with bf16 activations and K % 16 != 0: dense.
- "dense" = dequantize once with the reference into the activation dtype, then F.linear.
  Correct and fast but it holds 16-bit weights; no layer of the supported models needs it
  (their K are multiples of 64).

nf4 has no fused op. benchmarks/nf4_cpu.py times the candidates (results in
benchmarks/results/nf4-cpu-2026-11-23.json; 2-core AMD EPYC with AVX512-BF16, torch 2.13,
bf16, group 64, median microseconds), K x N:

    candidate                       576x960   576x576   576x3072  1536x576
    M = 1 (decode)
      unpack + index + scale + mm      2897      1034       6316      2968
      byte->pair table + scale + mm    1693       604       5371      1582
      per-call x-table gather (gemv)    988       458       2582      1453
      dequantize once, F.linear          87        45        215        82
      (int4 fused op, for scale)         38        26        114        50
    M = 64 (prefill)
      unpack + index + scale + mm      2076      1938       7223      3719
      byte->pair table + scale + mm    1266      1238       4357      2011
      dequantize once, F.linear         369       236       1189       589
      (int4 fused op, for scale)        846       505       2674      1600

Chosen: dequantize once at prepare, F.linear per call: 5-30x faster than any path that
keeps 4-bit codes resident, because CPU gathers do not vectorize and every call would
re-expand N*K values; the cost is 16-bit weight memory for nf4 layers on CPU. Note that at
M = 64 dense bf16 also beats the int4 fused op (2.2-2.7x): prefill-sized batches would be
faster through a dense path, a choice for batch-size dispatch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import reference

# Tensors plus a few ints (sizes); never strings or config objects.
Prepared = dict[str, Tensor | int]

_INT4_KERNEL_GROUPS = (32, 64, 128, 256)
_INT4_N_MULTIPLE = 16
_INT8_BF16_K_MULTIPLE = 16
_ALIGN = 64


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _rows(x: Tensor, K: int, act_dtype: torch.dtype, fmt: str) -> Tensor:
    """x [..., K] -> contiguous [M, K]; a wrong dtype is the caller's bug, so say how to fix it."""
    if x.dtype != act_dtype:
        raise TypeError(
            f"{fmt} weights were prepared for {act_dtype} activations but x is {x.dtype}; "
            f"prepare with act_dtype={x.dtype} or cast x"
        )
    if x.shape[-1] != K:
        raise ValueError(f"{fmt} linear expects x[..., {K}], got {tuple(x.shape)}")
    return x.reshape(-1, K).contiguous()


def _finish(y: Tensor, lead: torch.Size, N: int, bias: Tensor | None) -> Tensor:
    """y [M, N_padded] -> [*lead, N] with bias added in place, keeping y's dtype."""
    if y.shape[1] != N:
        y = y[:, :N].contiguous()
    if bias is not None:
        y.add_(bias)
    return y.view(*lead, N)


def _dense(w: Tensor, act_dtype: torch.dtype) -> Prepared:
    """Fallback: float32 [N, K] dequantized weights -> {"weight": [N, K] act_dtype}."""
    return {"weight": w.to(act_dtype).contiguous()}


def _dense_linear(x: Tensor, prepared: Prepared, bias: Tensor | None, fmt: str) -> Tensor:
    w = prepared["weight"]
    N, K = w.shape
    y = F.linear(_rows(x, K, w.dtype, fmt), w)
    return _finish(y, x.shape[:-1], N, bias)


def is_dense(prepared: Prepared) -> bool:
    """True when prepare fell back to dequantized 16-bit weights (nf4 always does)."""
    return "weight" in prepared


# ---------------------------------------------------------------------------------------------
# int4: aten._weight_int4pack_mm_for_cpu
# ---------------------------------------------------------------------------------------------


def _int4_kernel_group(K: int, group_size: int) -> int | None:
    """The op's group size serving groups of `group_size` over K, or None if there is none."""
    kg = math.gcd(K, group_size)
    return kg if kg in _INT4_KERNEL_GROUPS else None


def _int4_scales_and_zeros(
    scales: Tensor, zeros: Tensor, group_size: int, K: int, kg: int, act_dtype: torch.dtype
) -> Tensor:
    """scales, zeros [N, G] -> [K/kg, N, 2] act_dtype, one row per kernel group."""
    # Kernel group j starts at k = j*kg, which lies in stored group (j*kg) // group_size.
    src = torch.arange(0, K, kg, device=scales.device) // group_size
    sz = torch.stack([scales[:, src].T, zeros[:, src].T], dim=-1)
    return sz.to(act_dtype).contiguous()


def int4_prepare(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    K: int,
    act_dtype: torch.dtype = torch.bfloat16,
) -> Prepared:
    """Repack int4 weights for the fused CPU op (or dequantize, see the module docstring).

    qweight uint8 [N, ceil(K/2)], scales/zeros float32 [N, ceil(K/group_size)].
    Returns {"packed": uint8 [Np, K/2], "scales_and_zeros": [K/kg, Np, 2] act_dtype,
    "group_size": kg, "N": N} with Np = N rounded up to 16, or {"weight": [N, K] act_dtype}.
    """
    kg = _int4_kernel_group(K, group_size)
    if kg is None:
        w = reference.dequantize_int4(qweight, scales, zeros, group_size, K)
        return _dense(w, act_dtype)
    N = qweight.shape[0]
    q = reference.unpack_nibbles(qweight, K).to(torch.int32)
    sz = _int4_scales_and_zeros(scales.float(), zeros.float(), group_size, K, kg, act_dtype)
    pad = -N % _INT4_N_MULTIPLE
    if pad:
        # Padded rows have scale 0 and zero 0, so they compute 0 and are sliced off.
        q = torch.cat([q, q.new_full((pad, K), 8)])
        sz = torch.cat([sz, sz.new_zeros(sz.shape[0], pad, 2)], dim=1)
    # innerKTiles (2) only matters for the CUDA layout; the CPU packer ignores it.
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    return {"packed": packed, "scales_and_zeros": sz, "group_size": kg, "N": N}


def int4_linear(x: Tensor, prepared: Prepared, bias: Tensor | None = None) -> Tensor:
    """x [..., K] act_dtype -> [..., N] act_dtype."""
    if is_dense(prepared):
        return _dense_linear(x, prepared, bias, "int4")
    packed, sz = prepared["packed"], prepared["scales_and_zeros"]
    K = packed.shape[1] * 2
    x2 = _rows(x, K, sz.dtype, "int4")
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, prepared["group_size"], sz)
    return _finish(y, x.shape[:-1], prepared["N"], bias)


# ---------------------------------------------------------------------------------------------
# int8: aten._weight_int8pack_mm
# ---------------------------------------------------------------------------------------------


def int8_prepare(
    qweight: Tensor, scales: Tensor, act_dtype: torch.dtype = torch.bfloat16
) -> Prepared:
    """qweight int8 [N, K], scales float32 [N] -> {"qweight", "scales" act_dtype [N]},
    or {"weight": [N, K] act_dtype} where the op cannot serve the shape (bf16, K % 16 != 0)."""
    K = qweight.shape[1]
    if act_dtype == torch.bfloat16 and K % _INT8_BF16_K_MULTIPLE:
        return _dense(reference.dequantize_int8(qweight, scales), act_dtype)
    if not qweight.is_contiguous() or qweight.data_ptr() % _ALIGN:
        # The op segfaults for M > 1 on a weight that is not 64-byte aligned (tensors read
        # from safetensors files sit at 8-byte offsets); a fresh allocation is aligned.
        qweight = qweight.contiguous().clone()
    return {"qweight": qweight, "scales": scales.to(act_dtype).contiguous()}


def int8_linear(x: Tensor, prepared: Prepared, bias: Tensor | None = None) -> Tensor:
    """x [..., K] act_dtype -> [..., N] act_dtype."""
    if is_dense(prepared):
        return _dense_linear(x, prepared, bias, "int8")
    qweight, scales = prepared["qweight"], prepared["scales"]
    N, K = qweight.shape
    y = torch.ops.aten._weight_int8pack_mm(_rows(x, K, scales.dtype, "int8"), qweight, scales)
    return _finish(y, x.shape[:-1], N, bias)


# ---------------------------------------------------------------------------------------------
# nf4: no fused op; dequantize once (measurements in the module docstring)
# ---------------------------------------------------------------------------------------------


def nf4_prepare(
    qweight: Tensor,
    absmax: Tensor,
    group_size: int,
    K: int,
    act_dtype: torch.dtype = torch.bfloat16,
) -> Prepared:
    """qweight uint8 [N, ceil(K/2)], absmax float32 [N, G] -> {"weight": [N, K] act_dtype}.

    Dequantized in float32 and rounded once, so weights differ from the reference by at most
    half an ulp of act_dtype.
    """
    return _dense(reference.dequantize_nf4(qweight, absmax, group_size, K), act_dtype)


def nf4_linear(x: Tensor, prepared: Prepared, bias: Tensor | None = None) -> Tensor:
    """x [..., K] act_dtype -> [..., N] act_dtype."""
    return _dense_linear(x, prepared, bias, "nf4")
