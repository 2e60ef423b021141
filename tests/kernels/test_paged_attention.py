"""The paged decode-attention kernel against plain-torch oracles.

On a machine without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py
sets it), on a GPU machine compiled on CUDA. Contexts are short so the interpreter stays quick,
and chosen to cross block and tile edges: 1 token, a context ending mid-block, whole blocks,
and a sequence whose blocks are scattered through the pool in shuffled order.

Tolerance (derived, not tuned). The kernel and the oracles read the same values, upcast them
exactly to fp32 and compute in fp32; they differ in summation order and exp2 vs exp, then each
rounds its output once to the output dtype. With u32 = 2**-24 and eps the output dtype's
machine epsilon:
- a score is a D-term fp32 dot: its error is <= D * u32 * S, S = scale * max_n sum_d |q_d k_nd|;
  an absolute error e in a score is a relative error ~e in its softmax weight, twice over
  (the weight and the normalizing sum);
- the weighted sum of ctx values in fp32: <= ctx * u32 * max|v|;
- the output is a convex combination of values (|o| <= max|v|), and two fp32 results within
  the bound above can round to outputs one ulp apart: <= eps * |o|.
A wrong slot, head or mask moves a result by the order of |v| / ctx or more, far above this.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels.triton.paged_attention import (  # noqa: E402
    paged_decode_attention,
    reference_paged_decode_attention,
)
from kernels.triton.qgemm import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
# On a GPU machine every test here runs compiled on CUDA and `pytest -m gpu` selects them.
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="long contexts need a CUDA device")

U32 = 2.0**-24


def _case(context_lens: list[int], H: int, Hkv: int, D: int, block_size: int,
          dtype: torch.dtype, seed: int = 0, spare_blocks: int = 3, shuffle_last: bool = True):
    """q, caches, block tables and lengths (on DEVICE) for sequences with these contexts.

    Sequences take consecutive blocks of the pool in order, except the last (shuffle_last),
    which takes blocks scattered over what is left, in shuffled order. Table rows are padded
    with 0; `spare_blocks` blocks belong to no sequence.
    """
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-c // block_size) for c in context_lens]
    total = sum(n_blocks) + spare_blocks
    max_blocks = max(n_blocks) + 1  # at least one padding entry in every row
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    free = list(range(total))
    for b, n in enumerate(n_blocks):
        if shuffle_last and b == len(n_blocks) - 1:
            pick = torch.randperm(len(free), generator=g)[:n].tolist()
            mine = [free[i] for i in pick]
        else:
            mine = free[:n]
        free = [blk for blk in free if blk not in mine]
        tables[b, :n] = torch.tensor(mine, dtype=torch.int32)
    k = torch.randn(total * block_size, Hkv, D, generator=g).to(dtype)
    v = torch.randn(total * block_size, Hkv, D, generator=g).to(dtype)
    q = torch.randn(len(context_lens), H, D, generator=g).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k, v, tables, lens)]


def _context(k_cache, v_cache, table, ctx: int, block_size: int):
    """The sequence's keys and values in token order, [ctx, Hkv, D]."""
    pos = torch.arange(ctx, device=table.device)
    slots = table[pos // block_size].long() * block_size + pos % block_size
    return k_cache[slots], v_cache[slots]


def _bound(q, k_cache, v_cache, tables, lens, block_size, scale, ref):
    """Elementwise error bound of the module docstring, [B, H, D]."""
    B, H, D = q.shape
    group = H // k_cache.shape[1]
    eps = torch.finfo(ref.dtype).eps
    bounds = []
    for b in range(B):
        ctx = int(lens[b])
        k, v = _context(k_cache, v_cache, tables[b], ctx, block_size)
        k = k.float().repeat_interleave(group, dim=1)
        S = scale * torch.einsum("hd,nhd->hn", q[b].float().abs(), k.abs()).max()
        vmax = v.float().abs().max()
        fp32 = U32 * (2 * D * S + ctx + 16) * vmax
        bounds.append(eps * ref[b].float().abs() + fp32)
    return torch.stack(bounds)


def _sdpa(q, k_cache, v_cache, tables, lens, block_size, scale):
    """torch's scaled_dot_product_attention in fp32 on each gathered context."""
    outs = []
    for b in range(q.shape[0]):
        k, v = _context(k_cache, v_cache, tables[b], int(lens[b]), block_size)
        o = F.scaled_dot_product_attention(
            q[b].float()[None, :, None, :], k.float().transpose(0, 1)[None],
            v.float().transpose(0, 1)[None], scale=scale, enable_gqa=True)
        outs.append(o[0, :, 0, :])
    return torch.stack(outs).to(q.dtype)


def _assert_close(out, expected, bound, what: str):
    assert out.dtype == expected.dtype and out.shape == expected.shape, what
    err = (out.float() - expected.float()).abs()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: error {err.flatten()[worst]:.3g} > bound "
                                  f"{bound.flatten()[worst]:.3g} at {worst.item()}")


def _check(case, block_size, scale, block_n=None):
    q, k, v, tables, lens = case
    out = paged_decode_attention(q, k, v, tables, lens, block_size, scale, block_n=block_n)
    ref = reference_paged_decode_attention(q, k, v, tables, lens, block_size, scale)
    bound = _bound(q, k, v, tables, lens, block_size, scale, ref)
    _assert_close(out, ref, bound, "vs reference")
    _assert_close(out, _sdpa(q, k, v, tables, lens, block_size, scale), bound, "vs sdpa")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (8, 8, 64)], ids=["gqa9-3", "mha8"])
def test_matches_reference_and_sdpa(H, Hkv, D, block_size, dtype):
    # 1 token; ends mid-block; several whole blocks; several blocks, shuffled, ending mid-block
    lens = [1, block_size + 5, 3 * block_size, 2 * block_size + 7]
    _check(_case(lens, H, Hkv, D, block_size, dtype, seed=block_size + H), block_size,
           D**-0.5)


@pytest.mark.parametrize("block_n", [8, 16, 64, 128])
def test_tiles_smaller_and_larger_than_a_block(block_n):
    """A tile may cover part of a block, exactly one, several, or more than a whole context."""
    _check(_case([1, 21, 50, 77], 9, 3, 64, 16, torch.float32, seed=block_n), 16, 0.125,
           block_n=block_n)


def test_fp16():
    _check(_case([3, 40, 70], 9, 3, 64, 16, torch.float16, seed=1), 16, 0.125)


def test_padded_head_dim_and_group():
    """head_dim 48 and groups of 3 and 6 heads are padded to powers of two inside the kernel."""
    _check(_case([5, 33, 64], 6, 2, 48, 16, torch.float32, seed=2), 16, 48**-0.5)
    _check(_case([17, 40], 12, 2, 48, 32, torch.bfloat16, seed=3), 32, 48**-0.5)


def test_peaked_softmax():
    """Large scores: the running max must be subtracted before exp (no overflow to inf)."""
    _check(_case([1, 30, 90], 9, 3, 64, 16, torch.float32, seed=4), 16, 4.0)


def test_garbage_outside_the_context_is_ignored():
    """NaN and huge values in unused slots (the tail of a last block, blocks nobody owns) and
    any values in table padding leave every result bitwise unchanged."""
    bs = 16
    q, k, v, tables, lens = _case([1, 21, 48, 39], 9, 3, 64, bs, torch.float32, seed=5)
    clean = paged_decode_attention(q, k, v, tables, lens, bs, 0.125)
    used = torch.zeros(k.shape[0], dtype=torch.bool, device=k.device)
    for b in range(len(lens)):
        ctx = int(lens[b])
        pos = torch.arange(ctx, device=k.device)
        used[tables[b, pos // bs].long() * bs + pos % bs] = True
    assert (~used).sum() > 3 * bs  # spare blocks and block tails exist
    k_bad, v_bad, tables_bad = k.clone(), v.clone(), tables.clone()
    k_bad[~used] = float("nan")
    v_bad[~used] = float("nan")
    k_bad[~used & (torch.arange(k.shape[0], device=k.device) % 2 == 0)] = 3e38
    padding = [-1, 2**31 - 1, -(2**31), 7]  # out of the pool either way, or someone's block
    for b in range(len(lens)):
        n = -(-int(lens[b]) // bs)
        for j in range(n, tables.shape[1]):
            tables_bad[b, j] = padding[(b + j) % len(padding)]
    out = paged_decode_attention(q, k_bad, v_bad, tables_bad, lens, bs, 0.125)
    assert torch.equal(out, clean)


def test_a_sequence_does_not_depend_on_its_batch():
    """One program per (sequence, kv head): a row's result is bitwise the same alone."""
    bs = 16
    q, k, v, tables, lens = _case([7, 50, 33], 9, 3, 64, bs, torch.bfloat16, seed=6)
    batch = paged_decode_attention(q, k, v, tables, lens, bs, 0.125)
    for b in range(3):
        alone = paged_decode_attention(q[b:b + 1], k, v, tables[b:b + 1], lens[b:b + 1], bs,
                                       0.125)
        assert torch.equal(alone, batch[b:b + 1]), b


def test_strided_query_from_a_fused_projection():
    """q as a view of a fused qkv output: rows and heads strided, head_dim contiguous."""
    bs = 16
    q, k, v, tables, lens = _case([9, 40], 9, 3, 64, bs, torch.float32, seed=7)
    qkv = torch.randn(2, 9 + 6, 64, device=q.device)
    qkv[:, :9] = q
    view = qkv[:, :9]
    assert not view.is_contiguous()
    out = paged_decode_attention(view, k, v, tables, lens, bs, 0.125)
    assert torch.equal(out, paged_decode_attention(q, k, v, tables, lens, bs, 0.125))


def test_rejects_bad_layouts():
    bs = 16
    q, k, v, tables, lens = _case([5], 9, 3, 64, bs, torch.float32)
    with pytest.raises(AssertionError, match="int32|dtype"):
        paged_decode_attention(q, k, v, tables.long(), lens, bs, 0.125)
    with pytest.raises(AssertionError, match="multiple"):
        paged_decode_attention(q[:, :8], k, v, tables, lens, bs, 0.125)
    with pytest.raises(AssertionError, match="power of two"):
        paged_decode_attention(q, k, v, tables, lens, bs, 0.125, block_n=24)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("H,Hkv,D,bs", [(9, 3, 64, 16), (32, 8, 128, 16), (28, 4, 128, 32)])
def test_long_contexts_on_gpu(H, Hkv, D, bs, dtype):
    lens = [1, 1000, 2047, 4096 + 5, 3 * bs]
    _check(_case(lens, H, Hkv, D, bs, dtype, seed=D + H), bs, D**-0.5)


def test_engine_attention_sends_decode_rows_through_the_kernel():
    """engine/layers/attention.py with decode_kernel="triton": a step that mixes two decodes and a
    prompt chunk gives the per-sequence SDPA result, and the kernel ran on the decode rows."""
    from engine.layers import attention

    torch.manual_seed(3)
    cache = attention.KVCache(1, 12, 16, 3, 64, torch.float32, DEVICE)
    cache.k[0].normal_()
    cache.v[0].normal_()
    tables = [[7, 2, 9], [4, 0], [11, 5, 1, 8]]
    qlens, ctxs = [1, 5, 1], [37, 20, 50]
    T = sum(qlens)
    q = torch.randn(T, 9, 64, device=DEVICE)
    k, v = torch.randn(T, 3, 64, device=DEVICE), torch.randn(T, 3, 64, device=DEVICE)
    plain = attention.AttentionBatch.build(tables, qlens, ctxs, cache, DEVICE)
    want = attention.paged_attention(0, q, k, v, plain, 0.125)
    fused = attention.AttentionBatch.build(tables, qlens, ctxs, cache, DEVICE,
                                           decode_kernel="triton")
    assert fused.decode.seqs == [0, 2] and fused.decode.rows.tolist() == [0, 6]
    got = attention.paged_attention(0, q, k, v, fused, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
