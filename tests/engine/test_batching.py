"""Continuous batching on the default model: a request's output does not depend on what else
runs beside it, through preemption, chunked prefill and prefix reuse; and no block is lost."""

from __future__ import annotations

import functools

import pytest

from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "a red bicycle", "why the sky is blue", "bread", "a lighthouse keeper",
          "prime numbers", "an old clock", "winter in the mountains", "a lost cat", "coffee",
          "the moon landing", "a small robot", "rain on a roof", "chess", "a library", "volcanoes"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@functools.cache
def _prompts(llm) -> list[list[int]]:
    """16 chat prompts of different lengths (about 20 to 60 tokens)."""
    return [llm.encode_chat([{"role": "user", "content": f"Tell me about {t}." + " Please." * i}])
            for i, t in enumerate(TOPICS)]


@functools.cache
def _alone(quant: str) -> list[list[int]]:
    llm = _llm(quant)
    return [llm.generate(p, GREEDY)[0].token_ids for p in _prompts(llm)]


@functools.cache
def _llm(quant: str, **options) -> LLM:
    """batch_invariant: one kernel path for every batch size, so outputs can be compared
    token for token (by default a 512-row prefill chunk takes the dense path)."""
    return LLM("smollm2-135m", quant=quant, progress=False, max_model_len=256,
               batch_invariant=True, **options)


def test_batch_of_16_matches_each_request_alone():
    llm = _llm("int4")
    outs = llm.generate(_prompts(llm), GREEDY)
    assert [o.token_ids for o in outs] == _alone("int4")
    s = llm.engine.stats()
    assert s.running == s.waiting == s.kv_blocks_used == 0


def test_preemption_under_a_tiny_kv_budget_changes_no_output():
    """16 blocks of 16 tokens hold about four of these requests: the rest wait, run, are
    preempted and recomputed."""
    small = _llm("int4", kv_cache_memory=16 * _block_bytes(_llm("int4")))
    assert small.engine.blocks.num_blocks == 16
    outs = small.generate(_prompts(small), GREEDY)
    assert [o.token_ids for o in outs] == _alone("int4")
    stats = small.engine.stats()
    assert stats.preemptions > 0
    assert stats.kv_blocks_free == 16


def test_chunked_prefill_matches_whole_prefill():
    chunked = _llm("int4", max_num_batched_tokens=16)
    outs = chunked.generate(_prompts(chunked)[-4:], GREEDY)
    assert [o.token_ids for o in outs] == _alone("int4")[-4:]


def test_prefix_cache_reuses_blocks_and_counts_hits():
    llm = _llm("int4")
    system = [{"role": "system", "content": "You are a careful assistant. " * 6}]
    a = llm.encode_chat([*system, {"role": "user", "content": "Name a color."}])
    b = llm.encode_chat([*system, {"role": "user", "content": "Name a fruit."}])
    before = llm.engine.stats().prefix_cache_hit_tokens
    first = llm.generate(a, GREEDY)[0].token_ids
    hits_a = llm.engine.stats().prefix_cache_hit_tokens - before
    again = llm.generate(a, GREEDY)[0].token_ids
    hits_again = llm.engine.stats().prefix_cache_hit_tokens - before - hits_a
    shared = len(_common_prefix(a, b)) // 16 * 16
    llm.generate(b, GREEDY)
    hits_b = llm.engine.stats().prefix_cache_hit_tokens - before - hits_a - hits_again
    assert again == first
    assert hits_again == (len(a) - 1) // 16 * 16  # every full block but the last token's
    assert hits_b == shared and shared >= 32


def test_seed_reproduces_whatever_else_is_in_the_batch():
    llm = _llm("int4")
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    prompts = _prompts(llm)
    alone = llm.generate(prompts[3], params)[0].token_ids
    mixed = llm.generate(prompts[:8], [GREEDY] * 3 + [params] + [GREEDY] * 4)
    assert mixed[3].token_ids == alone
    other_seed = llm.generate(prompts[3], SamplingParams(max_tokens=12, temperature=1.0,
                                                         seed=8, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_abort_mid_generation_returns_every_block():
    llm = _llm("int4")
    engine = llm.engine
    free = engine.stats().kv_blocks_free
    for i, p in enumerate(_prompts(llm)[:6]):
        engine.add_request(f"abort-{i}", p, SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.stats().kv_blocks_free < free
    for i in range(6):
        assert engine.abort(f"abort-{i}")
    s = engine.stats()
    assert (s.kv_blocks_free, s.running, s.waiting) == (free, 0, 0)
    assert not engine.has_unfinished() and engine.step() == []


def _block_bytes(llm: LLM) -> int:
    cache = llm.engine.runner.cache
    return cache.nbytes // cache.num_blocks


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_prompt_logprobs_are_the_teacher_forced_ones_chunked_and_cached_alike():
    import torch

    llm, chunked = _llm("int4"), _llm("int4", max_num_batched_tokens=16)
    ids = _prompts(llm)[9]
    params = SamplingParams(max_tokens=1, prompt_logprobs=2)
    ref = torch.log_softmax(llm.score(ids), -1)
    for run in (llm, llm, chunked):  # the second run's prompt is in the prefix cache
        pl = run.generate(ids, params)[0].prompt_logprobs
        assert pl[0] is None and len(pl) == len(ids)
        for i in range(1, len(ids)):
            assert 2 <= len(pl[i]) <= 3 and ids[i] in pl[i]
            assert abs(pl[i][ids[i]] - ref[i - 1, ids[i]].item()) < 1e-3
            best = ref[i - 1].topk(2)
            assert set(best.indices.tolist()) <= set(pl[i])


def test_n_completions_share_the_prompt_blocks_and_reproduce_with_a_seed():
    llm = _llm("int4")
    prompt = _prompts(llm)[5]
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    engine = llm.engine
    hits = engine.stats().prefix_cache_hit_tokens
    engine.add_request("fork", prompt, params)
    engine.step()  # the prompt (it fits one step's budget) and the first completion's token
    seqs = engine._by_id["fork"].seqs
    assert len(seqs) == 3
    engine.step()  # the other two join: their tables start with the prompt's full blocks
    full = len(prompt) // 16
    assert full >= 2
    assert seqs[1].block_table.blocks[:full] == seqs[0].block_table.blocks[:full]
    assert seqs[2].block_table.blocks[:full] == seqs[0].block_table.blocks[:full]
    assert engine.stats().prefix_cache_hit_tokens - hits >= 2 * full * 16
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                result = out
    texts = [c.token_ids for c in result.outputs]
    assert [c.index for c in result.outputs] == [0, 1, 2]
    assert all(len(t) == 12 for t in texts) and len({tuple(t) for t in texts}) == 3
    # the first completion is the n = 1 request with the same seed; the set reproduces amid
    # other requests
    assert texts[0] == llm.generate(prompt, SamplingParams(
        max_tokens=12, temperature=1.0, seed=11, ignore_eos=True))[0].token_ids
    mixed = llm.generate(_prompts(llm)[:4] + [prompt], [GREEDY] * 4 + [params])
    assert [c.token_ids for c in mixed[4].outputs] == texts
    assert engine.stats().kv_blocks_used == 0


def test_n_completions_stream_their_own_deltas_and_abort_together():
    llm = _llm("int4")
    engine = llm.engine
    free = engine.stats().kv_blocks_free
    params = SamplingParams(n=2, max_tokens=30, temperature=1.0, seed=3, ignore_eos=True)
    engine.add_request("two", _prompts(llm)[2], params)
    pieces = {0: "", 1: ""}
    for _ in range(6):
        for out in engine.step():
            for c in out.outputs:
                pieces[c.index] += c.delta
                assert c.text.startswith(pieces[c.index])
    assert engine.abort("two")
    assert engine.stats().kv_blocks_free == free and not engine.has_unfinished()


def test_stop_strings_across_token_boundaries_in_a_batch():
    """Each request stops at a string spanning two of its greedy tokens, among requests that
    do not stop: the text ends right before it, and the others run to max_tokens."""
    llm = _llm("int4")
    prompts = _prompts(llm)[:6]
    tok = llm.tokenizer
    stops = {}
    for i in (1, 4):
        ids = _alone("int4")[i]
        pieces = [tok.decode(ids[:j], skip_special_tokens=True) for j in range(len(ids) + 1)]
        # token j ends with pieces[j + 1]'s character before the boundary; the stop string is
        # that character and the next one, which the following token brings
        j = next(j for j in range(3, len(ids) - 1) if len(pieces[j]) > len(pieces[j - 1])
                 and len(pieces[j + 1]) > len(pieces[j]) and pieces[j + 1].startswith(pieces[j]))
        stops[i] = pieces[j + 1][len(pieces[j]) - 1:len(pieces[j]) + 1]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                             stop=[stops[i]] if i in stops else None) for i in range(6)]
    outs = llm.generate(prompts, params)
    for i, out in enumerate(outs):
        full = tok.decode(_alone("int4")[i], skip_special_tokens=True)
        if i in stops:
            assert out.finish_reason == "stop"
            assert out.text == full[:full.find(stops[i])]
            assert stops[i] not in out.text
        else:
            assert out.finish_reason == "length" and out.text == full


def test_default_dispatch_sends_long_prefills_through_the_dense_path(monkeypatch):
    """Without batch_invariant, prepare measures where dequantize + fp32 GEMM beats the fused
    int4 op (here a scripted clock says: from 64 rows); a long prompt then runs dense and its
    logits match the fused path's within rounding."""
    from tests.kernels.cases import script_cpu_clock

    _, dense_calls = script_cpu_clock(monkeypatch, "_dense_rows", lambda M: M >= 64)
    adaptive = LLM("smollm2-135m", quant="int4", progress=False, max_model_len=256)
    layer = adaptive.model.quant_linears()["layers.0.mlp.down_proj"]
    from kernels import native

    fast = "cpu-native" if native.load() is not None else "cpu-fused"
    assert [layer.method.kernel_path(m) for m in (1, 63, 64, 512)] == \
        [fast, fast, "cpu-dense", "cpu-dense"]
    ids = [t for p in _prompts(adaptive)[:6] for t in p][:200]
    dense_calls.clear()
    got = adaptive.score(ids)
    assert dense_calls
    want = _llm("int4").score(ids)
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.95
