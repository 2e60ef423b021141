"""The A/B numbers on hand-made inputs: KL divergence, agreement, paired intervals, divergence
survival, gate expressions. No model is loaded."""

from __future__ import annotations

import math

import pytest
import torch

from engine.errors import ConfigError
from engine.eval import stats
from engine.eval.gate import failures, parse_gate


def test_token_stats_match_torch_kl_div_and_hand_counts():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    y = torch.tensor([0, 3, 3, 10, 7])
    s = stats.token_stats(a, b, y)
    expected = torch.nn.functional.kl_div(torch.log_softmax(b.double(), -1), torch.log_softmax(a.double(), -1),
                                          log_target=True, reduction="none").sum(-1)
    assert torch.allclose(s.kld, expected, atol=1e-12)
    assert s.top1.tolist() == (a.argmax(-1) == b.argmax(-1)).tolist()
    pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
    assert torch.allclose(s.dp, pb[range(5), y] - pa[range(5), y], atol=1e-6)
    assert torch.allclose(s.nll_a, -torch.log(pa[range(5), y]).double(), atol=1e-6)


def test_identical_logits_give_exact_zero():
    a = torch.randn(7, 50)
    s = stats.token_stats(a, a.clone(), torch.arange(7))
    assert s.kld.abs().max().item() == 0.0
    assert s.top1.all() and s.dp.abs().max().item() == 0.0


def _chunk(kld, nll_a, nll_b, top1=True, dp=0.0, n=4) -> stats.TokenStats:
    return stats.TokenStats(torch.full((n,), kld, dtype=torch.float64), torch.full((n,), top1),
                            torch.full((n,), dp), torch.full((n,), nll_a, dtype=torch.float64),
                            torch.full((n,), nll_b, dtype=torch.float64))


def test_summary_paired_ppl_ratio_and_intervals():
    # B is worse than A by exactly 0.1 nats per token in every chunk, while A's own NLL varies
    # a lot between chunks: the paired ratio is exp(0.1) with no spread at all.
    chunks = [_chunk(0.2, nll, nll + 0.1, dp=0.1) for nll in (1.0, 2.0, 3.0, 4.0)]
    s = stats.summarize(chunks)
    assert s["ppl_ratio"]["value"] == pytest.approx(math.exp(0.1), abs=1e-6)
    assert s["ppl_ratio"]["ci95"] == pytest.approx([math.exp(0.1)] * 2, abs=1e-6)
    assert s["ppl_a"] == pytest.approx(math.exp(2.5), abs=1e-3)
    assert s["kld"]["mean"] == pytest.approx(0.2) and s["kld"]["max"] == pytest.approx(0.2)
    assert s["rms_dp"]["value"] == pytest.approx(0.1, abs=1e-6)
    assert s["scored_tokens"] == 16
    # chunks that differ give an interval that holds the mean and has width
    varied = stats.summarize([_chunk(k, 1.0, 1.0, top1=k < 0.3) for k in (0.1, 0.2, 0.4, 0.8)])
    lo, hi = varied["kld"]["ci95"]
    assert lo < varied["kld"]["mean"] < hi
    assert varied["top1_agreement"]["value"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        stats.summarize(chunks[:1])


def test_first_divergence_and_survival_curve():
    assert stats.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert stats.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert stats.first_divergence([1, 2], [1, 2, 9]) == 2  # one stopped earlier
    # 4 outputs: diverge at 2, diverge at 2, identical (censored at 10), diverge at 5
    curve = stats.survival_curve([(2, True), (2, True), (10, False), (5, True)])
    assert curve == [(0, 1.0), (2, 0.5), (5, 0.25)]
    out = stats.compare_outputs([[1, 2, 3, 4], [1, 2], [7, 7]], [[1, 2, 0, 4], [1, 2], [8, 7]])
    assert out["exact_match_rate"] == pytest.approx(1 / 3, abs=1e-6)
    assert out["token_agreement"] == pytest.approx(6 / 8)  # 3 of 4, 2 of 2, 1 of 2
    assert out["first_divergence"] == [2, None, 0]
    assert out["median_first_divergence"] == 2  # survival 2/3 after 0, 1/3 after 2
    assert stats.compare_outputs([[1]], [[1]])["median_first_divergence"] is None


def test_gate_expressions():
    t = {"kld": {"mean": 0.03, "p99": 0.4}, "top1_agreement": {"value": 0.91},
         "ppl_ratio": {"value": 1.02}, "rms_dp": {"value": 0.05}}
    assert failures(parse_gate("kld<0.05"), t) == []
    assert failures(parse_gate(" kld < 0.05 , top1>=0.9,ppl_ratio<=1.05"), t) == []
    [line] = failures(parse_gate("kld<0.05,top1>0.95"), t)
    assert "top1" in line and "0.91" in line
    assert len(failures(parse_gate("kld_p99<0.1,rms_dp<0.01"), t)) == 2
    for text in ("kld", "kl<0.05", "kld<<0.1", "kld<abc", "kld<0.05,", "kld=0.05"):
        with pytest.raises(ConfigError, match="metrics: kld"):
            parse_gate(text)
