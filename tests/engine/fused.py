"""Hugging Face checkpoints in tests: per-shard weights joined the way nibble fuses them, and
a copy of a model with its lm_head tied to the embedding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def tied_copy(src: Path, out: Path) -> Path:
    """A copy of the Hugging Face directory `src` in `out` with lm_head tied to the embedding,
    as the default model's is."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    tensors = load_file(out / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
