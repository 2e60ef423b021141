"""W8A8: int8 weights times int8 activations, summed exactly in int32 (semantics:
kernels/reference.py, quantize_activations and w8a8_linear).

Layout (built once at load by ``repack``, plain torch): ``qweight`` int8 [K, N] (K-major, N
contiguous, as the other Triton layouts), ``scales`` float32 [N], and for static activation
scales ``input_scale`` float32 [1].

A call runs two kernels:

- ``_quantize_kernel``: one program per row of x [M, K]; pass 1 takes the row's absmax (dynamic
  only), pass 2 writes the int8 codes [M, K] and the row's scale [M]. The ops are the
  reference's, in its order: scale = absmax / 127, inv = 1 / scale once per row (0 for a zero
  scale), q = clamp(round_half_even(x * inv), -127, 127), with correctly rounded divisions
  (div_rn), so the codes are bitwise those of reference.quantize_activations.
- ``_gemm_kernel``: a [BLOCK_M, BLOCK_N] output tile per program; int8 [BLOCK_M, BLOCK_K] x
  int8 [BLOCK_K, BLOCK_N] dots accumulate int32 (exact), then the epilogue
  y = float32(acc) * sx[m] * scales[n] (+ bias) is rounded once to x's dtype.

Both launch with fp fusion off: a fused multiply-add would round once where the reference
rounds twice, and the codes (and fp32 outputs) would no longer match it bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# The smallest normal float32: the reference clamps a positive scale to it before 1 / scale.
_TINY = tl.constexpr(1.1754943508222875e-38)
# |acc| <= 127 * 127 * K must fit int32.
MAX_K = (2**31 - 1) // (127 * 127)


def repack(tensors: Mapping[str, Tensor], act_dtype: torch.dtype) -> dict[str, Tensor]:
    """Stored tensors (qweight int8 [N, K], scales [N], optional input_scale [1]) -> the layout
    of the module docstring. act_dtype changes nothing: the fp32 scales apply to the int32 sums,
    never to a 16-bit tile (kept for the signature every Triton layout shares)."""
    del act_dtype
    qweight = tensors["qweight"]
    if qweight.dtype != torch.int8:
        raise ValueError(f"w8a8 qweight must be int8, got {qweight.dtype}")
    out = {"qweight": qweight.T.contiguous(), "scales": tensors["scales"].float().contiguous()}
    if tensors.get("input_scale") is not None:
        out["input_scale"] = tensors["input_scale"].float().reshape(1).contiguous()
    return out


def layout_bytes(N: int, K: int, static: bool) -> int:
    """Bytes `repack` keeps for a [N, K] weight, from shapes alone."""
    return K * N + 4 * N + (4 if static else 0)


@triton.jit
def _round_half_even(v):
    """v rounded to the nearest integer, ties to even (torch.round), for |v| <= 2**22. Written
    out because libdevice's rint does not run in the interpreter. v is compared with
    floor(v) + 0.5 rather than v - floor(v) taken, so no subtraction can fuse with the
    multiply that produced v."""
    f = tl.floor(v)
    half = f + 0.5
    odd = (f.to(tl.int32) & 1).to(tl.float32)
    return tl.where(v > half, f + 1.0, tl.where(v < half, f, f + odd))


@triton.jit
def _quantize_kernel(x_ptr, s_in_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                     STATIC: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        s = tl.load(s_in_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(xv))
        s = tl.math.div_rn(tl.max(amax, axis=0), tl.full((), 127.0, tl.float32))
    one = tl.full((), 1.0, tl.float32)
    inv = tl.where(s > 0, tl.math.div_rn(one, tl.maximum(s, _TINY)), 0.0)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        xv = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        # Clamping to +-128 before rounding changes no code (rounding is monotone) and keeps
        # the int32 parity test in range for huge static ratios and infinities.
        v = tl.minimum(tl.maximum(xv * inv, -128.0), 128.0)
        q = tl.minimum(tl.maximum(_round_half_even(v), -127.0), 127.0)
        tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(tl.int8), mask=mask)


def quantize_activations(x: Tensor, input_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [M, K] fp32/fp16/bf16, rows contiguous; input_scale float32 [1] or None (dynamic)
    -> (codes int8 [M, K], scales float32 [M]), bitwise reference.quantize_activations."""
    M, K = x.shape
    assert x.stride(1) == 1, "x rows must be contiguous"
    assert input_scale is None or input_scale.numel() == 1
    q = torch.empty(M, K, device=x.device, dtype=torch.int8)
    s = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return q, s
    block_k = min(triton.next_power_of_2(K), 1024)
    _quantize_kernel[(M,)](x, input_scale if input_scale is not None else s, q, s, K,
                           x.stride(0), q.stride(0), STATIC=input_scale is not None,
                           BLOCK_K=block_k, num_warps=4, enable_fp_fusion=False)
    return q, s


@dataclass(frozen=True)
class Blocks:
    """One launch configuration of the GEMM."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def blocks_for(M: int) -> Blocks:
    """Block sizes by M: a 16-row tile for decode (the smallest a dot takes), wider tiles for
    prefill. Chosen from the shapes int8 tensor-core dots favour; not tuned on a GPU."""
    if M <= 16:
        return Blocks(16, 64, 128)
    if M <= 64:
        return Blocks(64, 64, 128)
    return Blocks(128, 128, 128, num_warps=8)


# M changes every call; specializing on it would compile each configuration several times.
@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(xq_ptr, sx_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K,
                 stride_xm, stride_wk, stride_ym, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(xq_ptr + offs_m[:, None] * stride_xm + k[None, :],
                    mask=m_mask[:, None] & (k[None, :] < K), other=0)
        b = tl.load(w_ptr + k[:, None] * stride_wk + offs_n[None, :],
                    mask=(k[:, None] < K) & n_mask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    sw = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemm(xq: Tensor, sx: Tensor, w: Mapping[str, Tensor], bias: Tensor | None,
         out_dtype: torch.dtype, blocks: Blocks | None = None) -> Tensor:
    """The int8 GEMM with its scaling epilogue.

    xq      int8 [M, K], rows contiguous
    sx      float32 [M]           activation scale per row
    w       qweight int8 [K, N] contiguous, scales float32 [N] (repack's layout)
    bias    [N] any float dtype, or None
    returns [M, N] in out_dtype: float32(xq @ qweight) * sx[:, None] * scales[None, :] (+ bias)
    """
    qweight, scales = w["qweight"], w["scales"]
    M, K = xq.shape
    N = qweight.shape[1]
    assert xq.dtype == torch.int8 and qweight.dtype == torch.int8
    assert xq.stride(1) == 1 and qweight.is_contiguous() and qweight.shape[0] == K
    assert sx.shape == (M,) and sx.dtype == torch.float32
    assert scales.shape == (N,) and scales.dtype == torch.float32
    assert bias is None or bias.shape == (N,)
    assert K <= MAX_K, f"K = {K} could overflow the int32 sums (at most {MAX_K})"
    y = torch.empty(M, N, device=xq.device, dtype=out_dtype)
    if M == 0:
        return y
    cfg = blocks or blocks_for(M)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
    _gemm_kernel[grid](xq, sx, qweight, scales, bias if bias is not None else scales, y,
                       M, N, K, xq.stride(0), qweight.stride(0), y.stride(0),
                       HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                       BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, enable_fp_fusion=False)
    return y


def linear(x: Tensor, w: dict[str, Tensor], bias: Tensor | None) -> Tensor:
    """x [..., K] fp32/fp16/bf16 -> [..., N] in x.dtype (reference.w8a8_linear); w is
    repack's layout, static when it holds input_scale."""
    K = x.shape[-1]
    xq, sx = quantize_activations(x.reshape(-1, K), w.get("input_scale"))
    y = gemm(xq, sx, w, bias, x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[1])
