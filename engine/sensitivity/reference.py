"""The reference side of a scan: the 16-bit model's pass over the calibration chunks, kept so
that a candidate module replays only the layers it changes, and KL(reference || candidate)
from the logits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.eval import stats
from engine.layers.attention import AttentionBatch, KVCache, kv_dtype
from engine.models.llama import LlamaModel

BLOCK = 16  # tokens per block of the scan's own KV cache
# KL(A || B) is computed in fp32 from the logit differences; a row where B's logits rise this
# far above their A-weighted mean (expm1 would overflow) is computed in float64 instead
EXP_MAX = 60.0


@dataclass
class _Pass:
    """One flat batch of chunks through the reference: what a replay from any layer needs."""

    attn: AttentionBatch
    cos: Tensor
    sin: Tensor
    inputs: list[Tensor]  # each layer's input [T, hidden]
    rows: Tensor  # [S] the scored rows: row r predicts token r + 1 of its chunk
    final: Tensor  # [S, hidden] lm_head's input at those rows
    logits: Tensor  # [S, vocab] fp32
    probs: Tensor  # [S, vocab] fp32
    sizes: list[int]  # scored rows per chunk


class Reference:
    """The reference model's pass over the calibration chunks, kept so that a candidate
    replays from the first layer it changes. Chunks go through in flat batches of at most
    `batch_tokens` rows (one chunk at least); each holds every layer's input and the scored
    rows' logits and probabilities (2 x scored rows x vocab x 4 bytes in all). The batches
    share one KV cache: a replay from layer i writes the keys and values of layers i.. before
    it reads them, and never reads the layers before i."""

    def __init__(self, model: LlamaModel, chunks: Sequence[Sequence[int]], batch_tokens: int):
        self.model = model
        batches = list(_batches(chunks, batch_tokens))
        cfg, device = model.config, model.embed_tokens.weight.device
        blocks = max(sum(-(-len(c) // BLOCK) for c in b) for b in batches)
        self.cache = KVCache(cfg.num_layers, blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim,
                             kv_dtype(model.policy.act_dtype, device), device)
        self.passes = [self._run(batch, device) for batch in batches]

    def _run(self, chunks: list[Sequence[int]], device: torch.device) -> _Pass:
        model = self.model
        lens = [len(c) for c in chunks]
        blocks = [-(-n // BLOCK) for n in lens]
        starts = [sum(blocks[:i]) for i in range(len(blocks))]
        tables = [list(range(s, s + n)) for s, n in zip(starts, blocks, strict=True)]
        attn = AttentionBatch.build(tables, lens, lens, self.cache, device)
        ids = torch.tensor([t for c in chunks for t in c], device=device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(device)
        seen: list[tuple] = []  # each layer's (h, cos, sin, attn), as forward passes them
        hooks = [layer.register_forward_pre_hook(lambda _m, args: seen.append(args))
                 for layer in model.layers]
        try:
            hidden = model(ids, positions, attn)
        finally:
            for hook in hooks:
                hook.remove()
        offsets = [sum(lens[:i]) for i in range(len(lens))]
        rows = torch.cat([torch.arange(o + n // 2 - 1, o + n - 1)
                          for o, n in zip(offsets, lens, strict=True)]).to(device)
        final = hidden[rows]
        logits = model.logits(final)
        return _Pass(attn, seen[0][1], seen[0][2], [a[0] for a in seen], rows, final, logits,
                     torch.softmax(logits, -1), [n - n // 2 for n in lens])

    def logits_from(self, p: _Pass, layer: int) -> Tensor:
        """The model's logits at the scored rows of `p`, recomputed from `layer` on."""
        model = self.model
        if layer >= len(model.layers):
            return model.logits(p.final)
        h = p.inputs[layer]
        for block in model.layers[layer:]:
            h = block(h, p.cos, p.sin, p.attn)
        return model.logits(model.norm(h)[p.rows])

    def kld(self, layer: int) -> tuple[Tensor, Tensor]:
        """(mean KL(reference || model) per chunk, scored tokens per chunk), the model as it
        is now, replayed from `layer`."""
        means, sizes = [], []
        for p in self.passes:
            kl = kld_rows(p.probs, p.logits, self.logits_from(p, layer))
            means += [part.mean() for part in kl.split(p.sizes)]
            sizes += p.sizes
        return torch.stack(means).cpu(), torch.tensor(sizes, dtype=torch.float64)


def _batches(chunks: Sequence[Sequence[int]], batch_tokens: int) -> Iterator[list]:
    batch: list = []
    for chunk in chunks:
        if batch and sum(map(len, batch)) + len(chunk) > batch_tokens:
            yield batch
            batch = []
        batch.append(chunk)
    if batch:
        yield batch


def kld_rows(probs_a: Tensor, logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """KL(A || B) per row [S] float64, from A's probabilities and both sides' logits [S, V];
    overwrites logits_b.

    With d = z_b - z_a centred under p_a (d' = d - E_a[d]): KL = log E_a[exp d'] =
    log1p(E_a[expm1 d']). d is small where B is close to A, so fp32 is accurate to ~1e-9 nats
    on rows of 5000 (a difference of two fp32 log-softmaxes is not, near logits of 20). In
    place, with the row sums as matrix products: a fresh [S, V] tensor costs as much as a
    pass over it (page faults), and stats.token_stats' float64 took 10x as long.
    """
    d = logits_b.sub_(logits_a)
    d.sub_(_row_dot(probs_a, d)[:, None])
    wild = d.amax(-1) > EXP_MAX
    exact = None
    if wild.any():  # B breaks down: float64 on B's logits less a per-row constant (KL's same)
        exact = stats.token_stats(logits_a[wild], logits_a[wild] + d[wild],
                                  torch.zeros(int(wild.sum()))).kld
        d.clamp_(max=EXP_MAX)
    kl = torch.log1p(_row_dot(probs_a, d.expm1_())).double()
    if exact is not None:
        kl[wild] = exact.to(kl.device)
    return kl.clamp_min(0.0)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """[S, V] x [S, V] -> [S]: sum(a * b, -1) without an [S, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
