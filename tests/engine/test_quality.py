"""Quantization error on real text: KL divergence of each format's next-token distribution
from bf16's, teacher-forced on CPython's pydoc_data.topics (ships with every Python)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
CHUNK, CHUNKS = 256, 2

# Thresholds: measured on this text (2 x 256 tokens) on the default model on a 2-core CPU,
# then given 50-100% headroom so that thread counts or BLAS builds cannot flip the test, while
# a broken kernel still fails it (int4 with its nibble order swapped measured 17.6; the
# limit is 0.7). Measured: int8 0.0044, int4-g128 0.46. int4-g128 loses this much because the
# default model's "original" weights are Q4_1 blocks of 32: a coarser 128-grid cannot hold
# them (int4-g32 lands on the same grid and measures 0.0015).
MAX_KLD = {"int8": 0.01, "int4": 0.7}


@pytest.fixture(scope="module")
def tokens(llm_factory):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = llm_factory("bf16").tokenizer.encode(text[:20000])
    assert len(ids) >= CHUNK * CHUNKS
    return [ids[i * CHUNK:(i + 1) * CHUNK] for i in range(CHUNKS)]


def _mean_kld(llm_ref, llm_q, chunks) -> float:
    klds = []
    for ids in chunks:
        p = torch.log_softmax(llm_ref.score(ids), -1)
        q = torch.log_softmax(llm_q.score(ids), -1)
        klds.append((p.exp() * (p - q)).sum(-1))
    return torch.cat(klds).mean().item()


def test_int8_closer_to_bf16_than_int4(llm_factory, tokens):
    ref = llm_factory("bf16")
    kld = {q: _mean_kld(ref, llm_factory(q), tokens) for q in ("int8", "int4")}
    print("mean KLD vs bf16:", kld)
    assert kld["int8"] < kld["int4"]
    for q, limit in MAX_KLD.items():
        assert 0 <= kld[q] < limit, f"{q}: mean KLD {kld[q]:.4f} >= {limit}"


def test_bf16_against_itself_is_zero(llm_factory, tokens):
    ref = llm_factory("bf16")
    assert _mean_kld(ref, ref, tokens[:1]) == pytest.approx(0.0, abs=1e-6)
