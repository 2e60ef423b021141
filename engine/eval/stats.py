"""The numbers of an A/B comparison, from logits to summaries with intervals.

Teacher-forced, per scored token t with true next token y: KL(A || B) over the full vocabulary
(A is the reference), whether A's and B's top-1 tokens agree, Δp = p_B(y) - p_A(y), and each
side's negative log-likelihood of y. Intervals are 95% percentile bootstraps over chunks (tokens
within a chunk are correlated; chunks are nearly independent), paired: every resample takes the
same chunks for A and B, so the PPL ratio's interval reflects the difference, not each side's
spread.

Free-running: greedy outputs of A and B from the same prompts, compared token by token; the
first divergent position has a Kaplan-Meier survival curve (outputs identical to the end are
censored at their length, not counted as diverging there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BOOTSTRAP_REPS = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class TokenStats:
    """Per scored token, all [S]."""

    kld: torch.Tensor  # KL(A || B), nats, float64
    top1: torch.Tensor  # bool: argmax A == argmax B
    dp: torch.Tensor  # p_B(y) - p_A(y)
    nll_a: torch.Tensor
    nll_b: torch.Tensor


def token_stats(logits_a: torch.Tensor, logits_b: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """logits [S, vocab] of A and B predicting `targets` [S]. Identical logits give exactly 0."""
    la = torch.log_softmax(logits_a.double(), -1)
    lb = torch.log_softmax(logits_b.double(), -1)
    kld = (la.exp() * (la - lb)).sum(-1).clamp_min(0.0)  # rounding can dip a hair below 0
    y = targets.to(la.device).long()[:, None]
    lpa, lpb = la.gather(1, y)[:, 0], lb.gather(1, y)[:, 0]
    return TokenStats(kld.cpu(), (la.argmax(-1) == lb.argmax(-1)).cpu(),
                      (lpb.exp() - lpa.exp()).float().cpu(), (-lpa).cpu(), (-lpb).cpu())


def score_chunk(score_a, score_b, chunk: list[int]) -> TokenStats:
    """Teacher-forced over one chunk; the second half is scored, so each scored token sees
    at least half a chunk of context. score_x(ids) -> logits [len(ids), vocab]."""
    half = len(chunk) // 2
    targets = torch.tensor(chunk[half:])
    return token_stats(score_a(chunk)[half - 1:-1], score_b(chunk)[half - 1:-1], targets)


def score_continuation(score_a, score_b, prompt: list[int], completion: list[int]) -> TokenStats:
    """Teacher-forced over the completion only, given the prompt (the server's shadow A/B)."""
    ids = list(prompt) + list(completion)
    p = len(prompt)
    rows = slice(p - 1, len(ids) - 1)
    return token_stats(score_a(ids)[rows], score_b(ids)[rows], torch.tensor(completion))


def resample_index(n_chunks: int) -> torch.Tensor:
    """[BOOTSTRAP_REPS, n_chunks] chunk indices of the bootstrap resamples; seeded, so every
    quantity resampled with it is paired (takes the same chunks)."""
    g = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    return torch.randint(0, n_chunks, (BOOTSTRAP_REPS, n_chunks), generator=g)


def mean_ci95(chunk_means: torch.Tensor, weights: torch.Tensor) -> list[float]:
    """95% bootstrap interval of the weighted mean of per-chunk means [C] (weights: scored
    tokens per chunk), resampled as summarize does."""
    idx = resample_index(len(chunk_means))
    w = weights.double()[idx]
    return _ci((chunk_means.double()[idx] * w).sum(1) / w.sum(1))


def _ci(samples: torch.Tensor) -> list[float]:
    return [samples.quantile(0.025).item(), samples.quantile(0.975).item()]


def summarize(chunks: list[TokenStats]) -> dict:
    """The teacher-forced section of a report: point values over all scored tokens, 95%
    bootstrap intervals over chunks."""
    if len(chunks) < 2:
        raise ValueError("need at least 2 chunks for intervals")
    per = {  # [chunks] of per-chunk means
        "kld": torch.stack([c.kld.mean() for c in chunks]),
        "top1": torch.stack([c.top1.double().mean() for c in chunks]),
        "dp2": torch.stack([c.dp.double().pow(2).mean() for c in chunks]),
        "nll_a": torch.stack([c.nll_a.mean() for c in chunks]),
        "nll_b": torch.stack([c.nll_b.mean() for c in chunks]),
    }
    weights = torch.tensor([len(c.kld) for c in chunks], dtype=torch.float64)
    idx = resample_index(len(chunks))
    w = weights[idx]

    def boot(values: torch.Tensor) -> torch.Tensor:  # weighted mean per resample
        return (values[idx] * w).sum(1) / w.sum(1)

    def point(values: torch.Tensor) -> float:
        return ((values * weights).sum() / weights.sum()).item()

    kld = torch.cat([c.kld for c in chunks])
    diff = per["nll_b"] - per["nll_a"]
    return {
        "scored_tokens": len(kld),
        "ppl_a": round(float(torch.exp(torch.tensor(point(per["nll_a"])))), 4),
        "ppl_b": round(float(torch.exp(torch.tensor(point(per["nll_b"])))), 4),
        "ppl_ratio": _value(torch.tensor(point(diff)).exp().item(), boot(diff).exp()),
        "kld": {"mean": _r(point(per["kld"])), "ci95": _value(0.0, boot(per["kld"]))["ci95"],
                "median": _r(kld.median().item()), "p90": _r(kld.quantile(0.9).item()),
                "p99": _r(kld.quantile(0.99).item()), "max": _r(kld.max().item())},
        "top1_agreement": _value(point(per["top1"]), boot(per["top1"])),
        "rms_dp": _value(point(per["dp2"]) ** 0.5, boot(per["dp2"]).sqrt()),
    }


def _r(x: float) -> float:
    return round(x, 6)


def _value(value: float, samples: torch.Tensor) -> dict:
    lo, hi = _ci(samples)
    return {"value": _r(value), "ci95": [_r(lo), _r(hi)]}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where the outputs differ (a length difference counts); None when
    they are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def survival_curve(events: list[tuple[int, bool]]) -> list[tuple[int, float]]:
    """Kaplan-Meier over (position, diverged) pairs: the fraction of outputs still identical
    after each position where one diverged. Starts at (0, 1.0)."""
    curve, s = [(0, 1.0)], 1.0
    at_risk = len(events)
    for t in sorted({t for t, _ in events}):
        died = sum(1 for u, d in events if u == t and d)
        if died and at_risk:
            s *= 1 - died / at_risk
            curve.append((t, s))
        at_risk -= sum(1 for u, _ in events if u == t)
    return curve


def compare_outputs(outs_a: list[list[int]], outs_b: list[list[int]]) -> dict:
    """The free-running section: exact-match rate, position-wise token agreement, the first
    divergence per prompt and its survival curve, and the median first divergence (None when
    fewer than half diverged)."""
    events, same, total, firsts = [], 0, 0, []
    for a, b in zip(outs_a, outs_b, strict=True):
        first = first_divergence(a, b)
        firsts.append(first)
        events.append((len(a), False) if first is None else (first, True))
        same += sum(x == y for x, y in zip(a, b, strict=False))
        total += max(len(a), len(b))
    curve = survival_curve(events)
    below = [t for t, s in curve if s <= 0.5]
    return {"prompts": len(outs_a),
            "exact_match_rate": _r(sum(f is None for f in firsts) / len(firsts)),
            "token_agreement": _r(same / total) if total else 1.0,
            "median_first_divergence": below[0] if below else None,
            "first_divergence": firsts,
            "survival": [[t, _r(s)] for t, s in curve]}
