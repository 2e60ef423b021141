"""Sampling options beyond greedy/top-k/top-p, on the default model in int4."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine import SamplingParams
from engine.errors import ConfigError

pytestmark = pytest.mark.slow
PROMPT = "List the numbers: one, two, three,"


def test_logit_bias_forces_a_token(llm_factory):
    llm = llm_factory("int4")
    forced = llm.tokenizer.encode(" banana")[0]
    out = llm.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0, logit_bias={forced: 100.0}))[0]
    assert out.token_ids == [forced] * 3


def distinct_tokens(llm, **penalties) -> int:
    """Distinct tokens in a greedy continuation of a repetitive prompt."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **penalties)
    return len(set(llm.generate("la la la la la la", params)[0].token_ids))


@pytest.mark.parametrize("penalty,value", [("repetition_penalty", 1.8), ("presence_penalty", 2.0),
                                           ("frequency_penalty", 2.0)])
def test_penalties_reduce_repeats(llm_factory, penalty, value):
    llm = llm_factory("int4")
    assert distinct_tokens(llm, **{penalty: value}) > distinct_tokens(llm)


def test_logprobs_are_the_model_distribution(llm_factory):
    llm = llm_factory("int4")
    out = llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for token, entry in zip(out.token_ids, lps, strict=True):
        assert next(iter(entry)) == token  # the chosen token comes first
        assert len(entry) == 3  # greedy: the chosen token is among the top 3
        assert entry[token] == max(entry.values()) and all(v <= 0 for v in entry.values())
        assert sum(math.exp(v) for v in entry.values()) <= 1.0 + 1e-4


def test_min_p_one_keeps_only_the_top_token(llm_factory):
    llm = llm_factory("int4")
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    sampled = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=1.5, min_p=1.0, seed=1))[0].token_ids
    assert sampled == greedy


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0},
                                    {"n": 0}, {"stop": [""]}, {"logprobs": 50}])
def test_bad_sampling_params_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("top,k,want", [
    ([], 1, {3}), ([], 2, {3, 7}), ([], 3, {3, 7, 41}),  # three tie for the top
    ([20], 2, {20, 3}), ([20], 3, {20, 3, 7}),  # one above the three tied
])
def test_top_k_keeps_exactly_k_lowest_ids_among_ties(top, k, want):
    """Logits that tie at the k-th value: top_k keeps k tokens, the tied ones with the lowest
    ids (as argmax picks), whatever the seed."""
    from engine.sampler import _sample_row

    row = torch.full((50,), -5.0)
    row[[7, 3, 41]] = 2.0
    row[top] = 3.0
    params = SamplingParams(temperature=1.0, top_k=k)
    picked = set()
    for seed in range(60):
        seq = SimpleNamespace(params=params, generator=torch.Generator().manual_seed(seed))
        picked.add(_sample_row(row, seq))
    assert picked == want
