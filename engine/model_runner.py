"""Builds the flat batch for a step, runs the model, samples.

This runner serves one sequence at a time from a contiguous KV cache; continuous batching
replaces it (and the cache) without touching the model.
"""

from __future__ import annotations

import torch

from engine.layers.attention import AttentionBatch, KVCache, kv_dtype
from engine.models.llama import LlamaModel
from engine.sampler import sample
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, max_model_len: int, device: torch.device):
        cfg = model.config
        self.model, self.device = model, device
        self.max_model_len = max_model_len
        self.cache = KVCache(cfg.num_layers, 1, max_model_len, cfg.num_kv_heads, cfg.head_dim,
                             kv_dtype(model.policy.act_dtype, device), device)

    def step(self, seq: Sequence) -> None:
        """Prefills the prompt on the first call, then decodes one token per call."""
        tokens = seq.uncached_token_ids()
        start = seq.num_cached
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device)
        batch = AttentionBatch.single(len(tokens), start + len(tokens), self.cache)
        hidden = self.model(ids, positions, batch)
        seq.num_cached += len(tokens)
        logits = self.model.logits(hidden[-1:]).cpu()  # sampling and its seeds live on the CPU
        (token, logprobs), = sample(logits, [seq])
        seq.append(token, logprobs)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [T, vocab] fp32 of a token list, in one prefill (slot 0)."""
        t = len(token_ids)
        if not 0 < t <= self.max_model_len:
            raise ValueError(f"score needs 1..{self.max_model_len} tokens, got {t}")
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(t, device=self.device),
                            AttentionBatch.single(t, t, self.cache))
        return self.model.logits(hidden)
