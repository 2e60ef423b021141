"""Attention over a flat batch with a contiguous per-sequence KV cache.

The model sees all sequences of a step concatenated into T rows; AttentionBatch says which
rows belong to which sequence and where each one's keys and values live. The paged cache of
the batching work replaces KVCache and the per-sequence loop below, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def kv_dtype(act_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on CPU: its bf16 kernels for small attention matmuls are ~5x slower than fp32
    (measured: 153 vs 28 us per decode SDPA call, 2-core AVX512-BF16); activations elsewhere."""
    return torch.float32 if device.type == "cpu" else act_dtype


class KVCache:
    """Keys and values per layer: [slots, kv_heads, max_len, head_dim], one row per sequence."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class AttentionBatch:
    """Per-sequence layout of one forward pass (sequences in row order)."""

    query_lens: list[int]  # rows of each sequence in this forward; sum = T
    context_lens: list[int]  # tokens each sequence has in the cache after this forward
    slots: list[int]  # cache slot of each sequence
    cache: KVCache

    def __post_init__(self) -> None:
        for q, c in zip(self.query_lens, self.context_lens, strict=True):
            if not 0 < q <= c <= self.cache.max_len:
                raise ValueError(f"bad attention layout: query {q}, context {c}, "
                                 f"cache length {self.cache.max_len}")

    @classmethod
    def single(cls, query_len: int, context_len: int, cache: KVCache, slot: int = 0):
        return cls([query_len], [context_len], [slot], cache)


def _mask(query_len: int, context_len: int, device) -> Tensor | None:
    """Causal mask for queries that sit at the end of a longer context, or None if trivial."""
    if query_len == 1:
        return None
    past = context_len - query_len
    cols = torch.arange(context_len, device=device)
    rows = torch.arange(query_len, device=device)[:, None]
    return cols <= rows + past  # [query_len, context_len] bool


def paged_attention(layer: int, q: Tensor, k: Tensor, v: Tensor, batch: AttentionBatch,
                    scale: float) -> Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H*D]; writes k/v into the cache first."""
    kc, vc = batch.cache.k[layer], batch.cache.v[layer]
    q = q.to(kc.dtype)
    outs, start = [], 0
    for qlen, ctx, slot in zip(batch.query_lens, batch.context_lens, batch.slots, strict=True):
        end = start + qlen
        kc[slot, :, ctx - qlen:ctx] = k[start:end].transpose(0, 1)
        vc[slot, :, ctx - qlen:ctx] = v[start:end].transpose(0, 1)
        qs = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, qlen, D]
        causal = qlen == ctx and qlen > 1
        mask = None if causal else _mask(qlen, ctx, q.device)
        o = F.scaled_dot_product_attention(
            qs, kc[slot:slot + 1, :, :ctx], vc[slot:slot + 1, :, :ctx],
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1).reshape(qlen, -1))
        start = end
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out.to(k.dtype)
