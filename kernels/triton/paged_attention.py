"""Paged decode attention: one new query row per sequence against its whole cached context.

Cache layout (engine/layers/attention.py): per layer, k_cache and v_cache are a flat pool of
slots [num_blocks * block_size, num_kv_heads, head_dim]; sequence b's block table row lists its
blocks in order, so its token i sits in slot

    block_tables[b, i // block_size] * block_size + i % block_size

and only the first ceil(context_lens[b] / block_size) entries of the row mean anything (the rest
is padding the kernel never reads). The newest token's key and value are already in the cache,
so the query attends to all context_lens[b] tokens (no causal mask within a decode row).

GQA: query head h reads kv head h // GROUP with GROUP = num_heads // num_kv_heads, so the GROUP
query heads of kv head j are the contiguous heads j*GROUP .. j*GROUP + GROUP - 1.

Grid: one program per (sequence, kv head). It holds the GROUP query rows of that kv head as a
[GROUP_PAD, D_PAD] tile (GROUP and head_dim padded to powers of two and masked) and walks the
context in tiles of BLOCK_N keys: per key it looks up its block in the table and gathers the
key and value rows of its slot, so each key and value is read once per group, not once per
query head, and a tile may span several cache blocks or part of one. Scores and the weighted
sum of values are broadcast multiplies reduced with tl.sum on the CUDA cores (a decode group
has far fewer than the 16 rows a tensor-core dot wants; this also keeps clear of the
interpreter's broken bf16 tl.dot in Triton 3.9).

Softmax is online, in fp32: a running max m and sum l per query row; each tile rescales the
accumulator by exp(m_old - m_new). Scores are kept in base 2 (q is pre-scaled by
scale * log2(e), then exp2). Keys past the context are masked to -inf before the max, and
their loads are masked too, so whatever sits in unused slots or in table padding (NaN, huge
values, out-of-range block ids) cannot reach the result. The output is rounded once, to q's
dtype, at the end.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = math.log2(math.e)


@triton.jit(do_not_specialize=["max_blocks"])
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, qk_scale,
                         max_blocks, stride_qb, stride_qh, stride_ks, stride_kh, stride_vs,
                         stride_vh, stride_tb, stride_ob, stride_oh,
                         BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                         GROUP_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # the query heads of this kv head

    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    q = q * qk_scale  # scale * log2(e): scores come out in base 2

    ctx = tl.load(lens_ptr + seq)
    table_row = table_ptr + seq.to(tl.int64) * stride_tb
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, D_PAD), dtype=tl.float32)
    for n0 in range(0, ctx, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < ctx
        # Padding entries are never loaded (other=0 keeps the address of masked keys in block
        # 0, so even the computed pointers stay inside the pool).
        block = tl.load(table_row + pos // BLOCK_SIZE,
                        mask=n_mask & (pos // BLOCK_SIZE < max_blocks), other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)

        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # n0 < ctx, so every tile has a real key: m_new is finite and exp2(-inf - m_new) = 0
        # takes the place of the accumulator's first rescale.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def default_block_n(group: int, head_dim: int) -> int:
    """Keys per tile: the [GROUP_PAD, BLOCK_N, D_PAD] fp32 product of a tile is held in
    registers, so it is kept near 8K elements (64 per thread at 4 warps), 16 to 128 keys.
    A starting point derived from register budget, not a measured tuning."""
    per_key = triton.next_power_of_2(group) * triton.next_power_of_2(head_dim)
    fits = max(1, 8192 // per_key)
    return max(16, min(128, 1 << (fits.bit_length() - 1)))  # the largest power of two <= fits


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, block_size: int, scale: float, *,
                           block_n: int | None = None, num_warps: int = 4) -> Tensor:
    """Decode attention over a paged KV cache (layout: module docstring).

    q             [B, H, D] fp16/bf16/fp32, the newest token's query per sequence; the last
                  dim contiguous
    k_cache       [num_slots, Hkv, D] fp16/bf16/fp32 (num_slots = num_blocks * block_size),
    v_cache       same shape and dtype; the last dim contiguous
    block_tables  int32 [B, max_blocks]; entries past a sequence's blocks are ignored
    context_lens  int32 [B], each in 1 .. max_blocks * block_size
    block_n       keys per tile, a power of two (default: default_block_n)
    returns       [B, H, D] in q.dtype
    """
    B, H, D = q.shape
    num_slots, Hkv, Dk = k_cache.shape
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"q dtype {q.dtype}"
    assert k_cache.dtype in (torch.float16, torch.bfloat16, torch.float32), \
        f"cache dtype {k_cache.dtype}"
    assert v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype
    assert Dk == D, f"head_dim of q ({D}) and cache ({Dk}) differ"
    assert H % Hkv == 0, f"{H} query heads are no multiple of {Hkv} kv heads"
    assert num_slots % block_size == 0, "the cache is not a whole number of blocks"
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1, \
        "head_dim must be contiguous"
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32, \
        f"block_tables and context_lens must be int32, got {block_tables.dtype}, " \
        f"{context_lens.dtype}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B, \
        f"block_tables {tuple(block_tables.shape)} for {B} sequences"
    assert block_tables.stride(1) == 1 and context_lens.shape == (B,), "bad table layout"
    assert context_lens.is_contiguous(), "context_lens must be contiguous"
    assert q.device == k_cache.device == v_cache.device == block_tables.device \
        == context_lens.device
    group = H // Hkv
    if block_n is None:
        block_n = default_block_n(group, D)
    assert block_n >= 1 and block_n & (block_n - 1) == 0, "block_n must be a power of two"

    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    if B == 0:
        return out
    grid = (B, Hkv)
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, out, scale * LOG2E,
        block_tables.shape[1], q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0), out.stride(0),
        out.stride(1),
        BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=D, GROUP_PAD=triton.next_power_of_2(group),
        D_PAD=triton.next_power_of_2(D), BLOCK_N=block_n, num_warps=num_warps)
    return out


def reference_paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                     block_tables: Tensor, context_lens: Tensor, block_size: int,
                                     scale: float) -> Tensor:
    """Plain torch, one sequence at a time: gather the context's slots, softmax in fp32."""
    B, H, D = q.shape
    group = H // k_cache.shape[1]
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    for b in range(B):
        ctx = int(context_lens[b])
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [ctx, H, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
