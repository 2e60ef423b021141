"""nibble's C++ paged decode attention (kernels/csrc/paged_attention_cpu.cpp) against the
plain-torch oracles, with the error bound derived in tests/kernels/test_paged_attention.py
(the same computation: fp32 reads, fp32 softmax, a different summation order and exp)."""

from __future__ import annotations

import pytest
import torch

from kernels import native
from kernels.triton.paged_attention import reference_paged_decode_attention
from tests.kernels import test_paged_attention as pa

pytestmark = pytest.mark.skipif(native.load() is None,
                                reason=f"no native kernels: {native.supported() or 'build failed'}")


def _cpu_case(*args, **kw):
    return [t.cpu() for t in pa._case(*args, **kw)]


def _run(q, k, v, tables, lens, bs, scale):
    return native.load().paged_decode_attention(q, k, v, tables, lens, bs, scale)


def _check(case, bs, scale):
    q, k, v, tables, lens = case
    out = _run(q, k, v, tables, lens, bs, scale)
    ref = reference_paged_decode_attention(q, k, v, tables, lens, bs, scale)
    bound = pa._bound(q, k, v, tables, lens, bs, scale, ref)
    pa._assert_close(out, ref, bound, "vs reference")
    pa._assert_close(out, pa._sdpa(q, k, v, tables, lens, bs, scale), bound, "vs sdpa")
    return out


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (8, 8, 64), (12, 2, 48), (32, 8, 128)],
                         ids=["gqa9-3", "mha8", "gqa6-d48", "gqa4-d128"])
def test_matches_reference_and_sdpa(H, Hkv, D, block_size):
    # 1 token; ends mid-block; whole blocks; a long context in shuffled blocks, mid-block
    lens = [1, block_size + 5, 3 * block_size, 20 * block_size + 7]
    _check(_cpu_case(lens, H, Hkv, D, block_size, torch.float32, seed=block_size + H),
           block_size, D**-0.5)


def test_peaked_softmax():
    """Large scores: the max is subtracted before exp (no overflow to inf, no 0/0)."""
    _check(_cpu_case([1, 30, 90], 9, 3, 64, 16, torch.float32, seed=4), 16, 40.0)


def test_garbage_outside_the_context_is_ignored():
    """NaN in every slot no sequence owns leaves the results bitwise unchanged."""
    bs = 16
    q, k, v, tables, lens = _cpu_case([1, 21, 48, 39], 9, 3, 64, bs, torch.float32, seed=5)
    clean = _run(q, k, v, tables, lens, bs, 0.125)
    used = torch.zeros(k.shape[0], dtype=torch.bool)
    for b in range(len(lens)):
        pos = torch.arange(int(lens[b]))
        used[tables[b, pos // bs].long() * bs + pos % bs] = True
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~used] = float("nan")
    v_bad[~used] = float("nan")
    assert torch.equal(_run(q, k_bad, v_bad, tables, lens, bs, 0.125), clean)


def test_a_sequence_does_not_depend_on_its_batch():
    bs = 16
    q, k, v, tables, lens = _cpu_case([7, 50, 33, 130], 9, 3, 64, bs, torch.float32, seed=6)
    batch = _run(q, k, v, tables, lens, bs, 0.125)
    for b in range(len(lens)):
        alone = _run(q[b:b + 1], k, v, tables[b:b + 1], lens[b:b + 1], bs, 0.125)
        assert torch.equal(alone, batch[b:b + 1]), b


def test_bad_input_is_refused():
    q, k, v, tables, lens = _cpu_case([5], 9, 3, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match="context length"):
        _run(q, k, v, tables, torch.tensor([99], dtype=torch.int32), 16, 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        _run(q.bfloat16(), k, v, tables, lens, 16, 0.125)


def test_engine_attention_sends_decode_rows_through_the_kernel():
    """engine/layers/attention.py with decode_kernel="native": a step mixing two decodes and
    a prompt chunk gives the per-sequence SDPA result; a pure decode step too."""
    from engine.layers import attention

    torch.manual_seed(3)
    cache = attention.KVCache(1, 12, 16, 3, 64, torch.float32)
    cache.k[0].normal_()
    cache.v[0].normal_()
    for tables, qlens, ctxs in (([[7, 2, 9], [4, 0], [11, 5, 1, 8]], [1, 5, 1], [37, 20, 50]),
                                ([[7, 2, 9], [11, 5, 1, 8]], [1, 1], [37, 50])):
        T = sum(qlens)
        q = torch.randn(T, 9, 64)
        k, v = torch.randn(T, 3, 64), torch.randn(T, 3, 64)
        saved = [c.clone() for c in (cache.k[0], cache.v[0])]
        plain = attention.AttentionBatch.build(tables, qlens, ctxs, cache)
        want = attention.paged_attention(0, q, k, v, plain, 0.125)
        cache.k[0].copy_(saved[0])
        cache.v[0].copy_(saved[1])
        fused = attention.AttentionBatch.build(tables, qlens, ctxs, cache,
                                               decode_kernel="native")
        assert fused.decode.kernel == "native"
        got = attention.paged_attention(0, q, k, v, fused, 0.125)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
