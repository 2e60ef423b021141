"""Fused dequantize-GEMM kernels for int4, int8 (per channel or group-wise) and nf4 weights (layout: kernels/triton/layout.py).

y[M, N] = x[M, K] @ W[K, N] (+ bias), W dequantized in registers from the packed layout, so a
decode step reads 4 or 8 bits per weight. One kernel serves every format (FMT is a constexpr,
so each format compiles to its own straight-line code) and every shape regime:

- tiled (SPLIT_K = 1, USE_DOT): a [BLOCK_M, BLOCK_N] output tile per program, tensor-core dots
  over the K loop; for prefill-sized M.
- split-K (SPLIT_K > 1): the K loop is cut into SPLIT_K slices run by separate programs that
  add their fp32 partial tiles atomically; for decode, where M is tiny and N alone gives too
  few programs to fill the GPU.
- GEMV-style (USE_DOT = False): a broadcast multiply and a sum over K on the CUDA cores instead
  of a 16-row tensor-core dot; for M of 1 to 4, where a dot wastes most of its rows.

For int4 and nf4 each launch comes in two unpackings: per element (every k of a tile loads its
word and shifts by 4*(k % 8); the eight loads of a word hit the cache) or by nibble plane
(PLANES: one load of BLOCK_K/8 words, then eight passes, pass j taking nibble j of every word
against the x columns k = 8i + j; no word is loaded twice, x is read at stride 8).

Which one runs for which M is measured per GPU (kernels/triton/tuning.py). ``dequantize_kt``
writes the dense 16-bit W^T for the dequantize-then-torch.matmul path, the other candidate.

Accumulation is fp32. The dequantized tile is rounded to the activation dtype before a
tensor-core dot (as Marlin and every W4A16 Triton kernel do); the GEMV path and the interpreter
(TRITON_INTERPRET=1, whose bf16 dot is broken in Triton 3.9) multiply in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton.layout import FMT_INT4, FMT_INT8, FMT_INT8G


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of qgemm; ``dense`` means dequantize, then torch.matmul."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    use_dot: bool = True
    planes: bool = False  # int4/nf4: unpack by nibble plane (see the kernel); int8 ignores it
    num_warps: int = 4
    num_stages: int = 3
    dense: bool = False

    @property
    def label(self) -> str:
        """The path's name for logs and metrics: dequant-matmul, gemv, split-k or tiled."""
        if self.dense:
            return "dequant-matmul"
        if not self.use_dot:
            return "gemv"
        return "split-k" if self.split_k > 1 else "tiled"

    def describe(self) -> str:
        if self.dense:
            return self.label
        planes = " planes" if self.planes else ""
        return (f"{self.label}(m{self.block_m} n{self.block_n} k{self.block_k} "
                f"s{self.split_k} w{self.num_warps}{planes})")


@triton.jit
def _scale_codes(q, s_ptr, o_ptr, offs_k, offs_n, k0, K, N, stride_sg,
                 FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 weights from codes q [R, BLOCK_N] of rows offs_k [R]; zeros outside [K, N]."""
    if GROUP % BLOCK_K == 0:
        # The tile lies inside one group: one row of scales serves all its rows.
        g_off = (k0 // GROUP) * stride_sg + offs_n[None, :]
        s_mask = offs_n[None, :] < N
    else:
        g_off = (offs_k[:, None] // GROUP) * stride_sg + offs_n[None, :]
        s_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    s = tl.load(s_ptr + g_off, mask=s_mask, other=0.0).to(tl.float32)
    if FMT == 1 or FMT == 3:  # int4, int8g: q * scale + offset
        o = tl.load(o_ptr + g_off, mask=s_mask, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s + o
    else:  # nf4: o_ptr is the 16-entry codebook
        w = tl.load(o_ptr + q) * s
    return w


@triton.jit
def _dequant_tile(w_ptr, s_ptr, o_ptr, offs_k, offs_n, k0, K, N, stride_wk, stride_sg,
                  FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N] tile of W (int8: unscaled codes); zeros outside [K, N].
    One return at the end: the format branches are constexpr and compile away."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    if FMT == 0:  # int8 [K, N]
        q = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=mask, other=0)
        w = q.to(tl.float32)
    elif FMT == 3:  # int8g: uint8 codes [K, N], group scales and offsets
        q = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], mask=mask, other=0)
        w = _scale_codes(q, s_ptr, o_ptr, offs_k, offs_n, k0, K, N, stride_sg, FMT, GROUP,
                         BLOCK_K)
    else:
        # int4 / nf4: int32 words [K/8, N]; 8 consecutive k load the same word (cache hits)
        words = tl.load(w_ptr + (offs_k[:, None] // 8) * stride_wk + offs_n[None, :],
                        mask=mask, other=0)
        q = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF
        w = _scale_codes(q, s_ptr, o_ptr, offs_k, offs_n, k0, K, N, stride_sg, FMT, GROUP,
                         BLOCK_K)
    return w


@triton.jit
def _accumulate(acc, x, w, USE_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc [BM, BN] fp32 += x [BM, R] @ w [R, BN] (w fp32)."""
    if USE_DOT:
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    else:
        acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    return acc


# M changes every call; specializing on it (M == 1, M % 16 == 0) would compile each launch
# configuration up to three times for no gain.
@triton.jit(do_not_specialize=["M"])
def _qgemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, cs_ptr, b_ptr, y_ptr, M, N, K,
                  stride_xm, stride_wk, stride_sg, stride_ym,
                  FMT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                  PLANES: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # each split's K range, whole blocks
    k_begin = pid_k * k_span
    k_end = tl.minimum(k_begin + k_span, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if PLANES:
            # One load of BLOCK_K/8 packed words, then 8 nibble planes: plane j holds rows
            # k0 + 8i + j, so x is read at stride 8 and no weight word is loaded twice.
            offs_i = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(w_ptr + offs_i[:, None] * stride_wk + offs_n[None, :],
                            mask=(offs_i[:, None] < tl.cdiv(K, 8)) & (offs_n[None, :] < N),
                            other=0)
            for j in tl.static_range(8):
                offs_k = offs_i * 8 + j
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=m_mask & (offs_k[None, :] < K), other=0.0)
                w = _scale_codes((words >> (4 * j)) & 0xF, s_ptr, o_ptr, offs_k, offs_n, k0, K,
                                 N, stride_sg, FMT, GROUP, BLOCK_K)
                acc = _accumulate(acc, x, w, USE_DOT, UPCAST)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask & (offs_k[None, :] < K), other=0.0)
            w = _dequant_tile(w_ptr, s_ptr, o_ptr, offs_k, offs_n, k0, K, N, stride_wk,
                              stride_sg, FMT, GROUP, BLOCK_K)
            acc = _accumulate(acc, x, w, USE_DOT, UPCAST)
    if FMT == 0:
        acc *= tl.load(cs_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:  # noqa: SIM102  (HAS_BIAS is constexpr: a kernel without bias has no branch)
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, o_ptr, cs_ptr, out_ptr, N, K, stride_wk, stride_sg,
                    FMT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequant_tile(w_ptr, s_ptr, o_ptr, offs_k, offs_n, tl.program_id(0) * BLOCK_K, K, N,
                      stride_wk, stride_sg, FMT, GROUP, BLOCK_K)
    if FMT == 0:
        w *= tl.load(cs_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


def _format_args(fmt: int, w: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(qweight, scales, offsets-or-codebook, int8 column scales) as kernel pointers; a slot a
    format does not use gets any tensor (the constexpr FMT never reads it)."""
    q = w["qweight"]
    if fmt == FMT_INT8:
        return q, w["scales"], w["scales"], w["scales"]
    other = w["offsets"] if fmt in (FMT_INT4, FMT_INT8G) else w["codebook"]
    return q, w["scales"], other, w["scales"]


def qgemm(x: Tensor, w: dict[str, Tensor], fmt: int, group_size: int, N: int,
          bias: Tensor | None, cfg: KernelConfig) -> Tensor:
    """Fused dequantize-GEMM.

    x       [M, K] fp16/bf16, rows contiguous (stride 1 along K)
    w       the layout of kernels/triton/layout.py for `fmt`:
            int4/nf4 qweight int32 [ceil(K/8), N]; scales [G, N] act dtype;
            int4 offsets [G, N] act dtype; nf4 codebook fp32 [16];
            int8 qweight int8 [K, N], scales fp32 [N];
            int8g qweight uint8 [K, N], scales and offsets [G, N] act dtype
    bias    [N] or None
    returns [M, N] in x.dtype
    """
    M, K = x.shape
    qweight, scales, other, col_scales = _format_args(fmt, w)
    assert x.dtype in (torch.float16, torch.bfloat16), f"activations must be fp16/bf16, got {x.dtype}"
    assert x.stride(1) == 1, "x rows must be contiguous"
    assert qweight.is_contiguous() and qweight.shape[1] == N
    bytewise = fmt in (FMT_INT8, FMT_INT8G)  # one code per byte, no nibble packing
    assert qweight.shape[0] == (K if bytewise else -(-K // 8)), "qweight does not match K"
    assert fmt == FMT_INT8 or scales.shape == (-(-K // group_size), N), "scales do not match K, N"
    assert bias is None or bias.shape == (N,)
    assert cfg.block_k % 8 == 0 and not cfg.dense
    planes = cfg.planes and not bytewise
    assert not (planes and cfg.use_dot and cfg.block_k < 128), "plane dots need K >= 16"
    if cfg.split_k > 1:
        y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), cfg.split_k)
    _qgemm_kernel[grid](
        x, qweight, scales, other, col_scales, bias if bias is not None else col_scales, y,
        M, N, K, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        FMT=fmt, GROUP=group_size if fmt != FMT_INT8 else 1, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        USE_DOT=cfg.use_dot, UPCAST=cfg.use_dot and interpreting(), PLANES=planes,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y if cfg.split_k == 1 else y.to(x.dtype)


def dequantize_kt(w: dict[str, Tensor], fmt: int, group_size: int, K: int, N: int,
                  dtype: torch.dtype) -> Tensor:
    """The dense W^T [K, N] in `dtype` (int8 scales applied), for the dequant-matmul path."""
    qweight, scales, other, col_scales = _format_args(fmt, w)
    out = torch.empty(K, N, device=qweight.device, dtype=dtype)
    block_n, block_k = 64, 64
    grid = (triton.cdiv(K, block_k), triton.cdiv(N, block_n))
    _dequant_kernel[grid](qweight, scales, other, col_scales, out, N, K, qweight.stride(0),
                          scales.stride(0), FMT=fmt,
                          GROUP=group_size if fmt != FMT_INT8 else 1,
                          BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def linear(x: Tensor, w: dict[str, Tensor], fmt: int, group_size: int, N: int,
           bias: Tensor | None, cfg: KernelConfig) -> Tensor:
    """x [M, K] -> [M, N] through the path `cfg` names."""
    if not cfg.dense:
        return qgemm(x, w, fmt, group_size, N, bias, cfg)
    wt = dequantize_kt(w, fmt, group_size, x.shape[1], N, x.dtype)
    return torch.addmm(bias, x, wt) if bias is not None else x @ wt
