"""Rotary position embedding in the non-interleaved (rotate-half) layout of HF checkpoints.

GGUF files store q/k rows permuted for the interleaved layout; the loader undoes that, so
one rotary serves both sources.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> Tensor:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not scaling:
        return inv.float()
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "llama3":
        return _llama3_scaling(inv, scaling).float()
    raise NotImplementedError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)")


def _llama3_scaling(inv: Tensor, s: dict) -> Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    mid = (1 - smooth) * inv / factor + smooth * inv
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, scaled)


class RotaryEmbedding:
    """Holds cos/sin tables [max_positions, head_dim/2]; ``lookup`` runs once per forward."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        inv = inv_frequencies(head_dim, theta, scaling)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        self.cos, self.sin = angles.cos(), angles.sin()

    def lookup(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [T] -> cos, sin [T, 1, head_dim/2] in ``dtype``, broadcast over heads."""
        return (self.cos[positions].to(dtype).unsqueeze(1),
                self.sin[positions].to(dtype).unsqueeze(1))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, head_dim] -> rotated copy; cos/sin [T, 1, head_dim/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
