"""Sampling: logits of the rows being sampled -> one token each.

Greedy, temperature, top-k, top-p, min-p, penalties and logit bias; a per-request seed makes
a sample reproducible whatever else runs. Logprobs come from the model's raw distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.sequence import Sequence


def sample(logits: Tensor, seqs: list[Sequence]) -> list[tuple[int, dict[int, float] | None]]:
    """logits [B, V] fp32, one row per sequence -> (token, logprobs or None) per sequence."""
    out = []
    # greedy rows without logit changes: one argmax over all of them (first maximum, as per row)
    plain = [seq.params.greedy and not _adjusts(seq) for seq in seqs]
    top = logits.argmax(-1).tolist() if any(plain) else None
    for i, (row, seq) in enumerate(zip(logits, seqs, strict=True)):
        token = top[i] if plain[i] else _sample_row(_adjust(row, seq), seq)
        out.append((token, _logprobs(row, token, seq.params.logprobs)))
    return out


def _adjusts(seq: Sequence) -> bool:
    """Whether _adjust changes this sequence's logits."""
    return seq.logit_bias is not None or _penalizes(seq.params)


def _penalizes(p) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def _adjust(row: Tensor, seq: Sequence) -> Tensor:
    if seq.logit_bias is not None:
        ids, bias = seq.logit_bias
        row = row.index_add(0, ids, bias)
    if _penalizes(seq.params):
        row = _penalize(row, seq)
    return row


def _penalize(row: Tensor, seq: Sequence) -> Tensor:
    p, row = seq.params, row.clone()
    if p.repetition_penalty != 1.0:  # prompt and output, as in vLLM and HF
        seen = torch.tensor(sorted(set(seq.all_token_ids)), dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if seq.output_token_ids and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=row.numel()).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return row


def _sample_row(row: Tensor, seq: Sequence) -> int:
    p = seq.params
    if p.greedy:
        return int(row.argmax())
    if 0 < p.top_k < row.numel():  # before the division, which could make new ties
        row = _top_k(row, p.top_k)
    row = row / p.temperature
    probs = torch.softmax(row, -1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0)
    if p.top_p < 1:
        probs = _top_p(probs, p.top_p)
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def _top_k(row: Tensor, k: int) -> Tensor:
    """Keeps exactly k tokens; where logits tie at the k-th value (bf16 logits tie often),
    the lowest ids, as argmax picks them: top_k=1 is greedy."""
    kth = torch.topk(row, k).values[-1]
    keep = row > kth
    tied = (row == kth).nonzero().flatten()
    keep[tied[: k - int(keep.sum())]] = True
    return row.masked_fill(~keep, float("-inf"))


def _top_p(probs: Tensor, top_p: float) -> Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p."""
    # Stable, so that among tied probabilities (bf16 logits tie often) the lowest id comes
    # first, as in argmax: a tiny top_p then reproduces greedy exactly.
    sorted_p, order = probs.sort(descending=True, stable=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before this token already enough
    sorted_p[drop] = 0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def _logprobs(row: Tensor, token: int, k: int | None) -> dict[int, float] | None:
    if k is None:
        return None
    return logprob_dicts(row[None], [token], k)[0]


def logprob_dicts(logits: Tensor, tokens: list[int], k: int) -> list[dict[int, float]]:
    """logits [R, V] fp32 -> per row {token: logprob, then the k most likely others}."""
    lp = torch.log_softmax(logits, -1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    out = [{t: c} for t, c in zip(tokens, chosen, strict=True)]
    if k:
        top = torch.topk(lp, k)
        for d, ids, vals in zip(out, top.indices.tolist(), top.values.tolist(), strict=True):
            d.update({i: v for i, v in zip(ids, vals, strict=True) if i not in d})
    return out
