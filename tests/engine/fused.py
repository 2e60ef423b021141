"""Per-shard weights of a Hugging Face checkpoint, joined the way nibble fuses them."""

from __future__ import annotations

import torch

from engine.calibrate import HF_NAME


def by_module(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{HF prefix ("model.layers.0.self_attn.q_proj"): [n, K]} -> {our module
    ("layers.0.self_attn.qkv_proj"): its shards joined along the output rows}."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for prefix, w in weights.items():
        _, _, layer, hf = prefix.split(".", 3)
        module, shard = next(t for t, name in HF_NAME.items() if name == hf)
        shards.setdefault(f"layers.{layer}.{module}", {})[shard] = w
    return {m: torch.cat([s[i] for i in sorted(s)]) for m, s in shards.items()}
