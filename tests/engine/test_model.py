"""Our Llama implementation against transformers' own model on the same weights."""

from __future__ import annotations

import pytest
import torch

from engine.layers.attention import AttentionBatch, KVCache

PROMPT = "The capital of France is Paris. The Eiffel Tower stands in the city of"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model(default_source):
    from transformers import AutoModelForCausalLM

    path = default_source.path
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _prefill(llm, ids: list[int]) -> torch.Tensor:
    m = llm.model
    cache = KVCache(m.config.num_layers, 16, 16, m.config.num_kv_heads, m.config.head_dim, torch.float32)
    t = len(ids)
    hidden = m(torch.tensor(ids), torch.arange(t), AttentionBatch.single(t, t, cache))
    return m.logits(hidden), cache


def test_fp32_logits_match_transformers(llm_factory, hf_model):
    llm = llm_factory("fp32")
    ids = llm.tokenizer.encode(PROMPT)
    ours, _ = _prefill(llm, ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-3


def test_decode_step_matches_prefill(llm_factory):
    """The last token decoded against the cache gives the logits a full prefill gives."""
    llm = llm_factory("fp32")
    ids = llm.tokenizer.encode(PROMPT)
    full, _ = _prefill(llm, ids)
    _, cache = _prefill(llm, ids[:-1])
    m, t = llm.model, len(ids)
    hidden = m(torch.tensor(ids[-1:]), torch.tensor([t - 1]), AttentionBatch.single(1, t, cache))
    assert (m.logits(hidden)[0] - full[-1]).abs().max().item() <= 1e-3


def test_two_sequences_in_one_flat_batch_match_alone(llm_factory):
    """Rows of a flat batch of two prompts equal each prompt run alone."""
    llm = llm_factory("fp32")
    m = llm.model
    a, b = llm.tokenizer.encode(PROMPT), llm.tokenizer.encode("Once upon a time")
    cache = KVCache(m.config.num_layers, 32, 16, m.config.num_kv_heads, m.config.head_dim, torch.float32)
    # b's blocks first and out of order: the block table, not the slot order, places tokens
    tables = [list(range(16, 32)), [3, 1, 2, 0]]
    batch = AttentionBatch.build(tables, [len(a), len(b)], [len(a), len(b)], cache)
    ids = torch.tensor(a + b)
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])
    both = m.logits(m(ids, pos, batch))
    alone_b, _ = _prefill(llm, b)
    assert (both[len(a):] - alone_b).abs().max().item() <= 1e-3
