"""RMSNorm, kept in 16/32-bit whatever the linear layers use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., dim]. Statistics in fp32 as the reference models do, so 16-bit runs match.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        y = F.rms_norm(x.float(), (self.dim,), None, self.eps)
        return y.to(x.dtype) * self.weight
