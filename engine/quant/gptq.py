"""GPTQ (Frantar et al., 2022): quantize a weight column by column, each time spreading the
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs, H = 2 X^T X. Asymmetric, group-wise, integer zero points (the GPTQ layout's
q, z, s with W ~ s * (q - z)); lazy batch updates of `block` columns; optional act-order
(columns in order of decreasing H diagonal, groups then follow that order and g_idx records
them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GPTQResult:
    q: Tensor  # int32 [N, K] codes, in the original column order
    z: Tensor  # int32 [G, N] zero points
    scales: Tensor  # float32 [G, N], float16-representable
    g_idx: Tensor  # int32 [K]: the group of each input column
    error: float  # sum over rows of the Hessian-weighted error tr((W - Q) H (W - Q)^T) / N


def _group_params(w: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Per-row scale (rounded to float16, as stored) and integer zero point of a group [N, g].
    Zero points start at 1: the classic GPTQ layout stores z - 1 and cannot hold 0 (a group
    with no negative value loses its top code instead)."""
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    flat = lo == hi
    lo, hi = torch.where(flat, lo - 1, lo), torch.where(flat, hi + 1, hi)
    scale = ((hi - lo) / maxq).half().float()
    zero = torch.round(-lo / scale).clamp(1, maxq)
    return scale, zero


def gptq_quantize(w: Tensor, h: Tensor, bits: int = 4, group_size: int = 128,
                  damp: float = 0.01, block: int = 128, act_order: bool = False) -> GPTQResult:
    """w [N, K] float, h [K, K] the accumulated X^T X of the layer's inputs (any positive
    multiple: only its inverse's shape matters)."""
    maxq = 2 ** bits - 1
    W = w.detach().float().clone()
    N, K = W.shape
    H = h.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    # the upper Cholesky factor of H^-1: row i holds what quantizing column i does to the rest
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    G = -(-K // group_size)
    q = torch.zeros(N, K)
    scales, zeros = torch.zeros(G, N), torch.zeros(G, N)
    error = 0.0
    scale = zero = None
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        w1, q1, err1 = W[:, i1:i2].clone(), q[:, i1:i2], torch.zeros(N, i2 - i1)
        h1 = hinv[i1:i2, i1:i2]
        dinv = 1.0 / torch.diag(h1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # a new group: its range from the columns as they are now
                g = col // group_size
                span = torch.cat([w1[:, i:], W[:, i2:]], 1)[:, :group_size]
                scale, zero = _group_params(span, maxq)
                scales[g], zeros[g] = scale, zero
            x, code = w1[:, i], q1[:, i]
            torch.div(x, scale, out=code)
            code.round_().add_(zero).clamp_(0, maxq)
            err = err1[:, i]
            torch.sub(code, zero, out=err)
            err.mul_(scale).neg_().add_(x).mul_(dinv[i])  # (x - dequantized) / d
            w1[:, i:].addr_(err, h1[i, i:], alpha=-1.0)
        error += float((err1 ** 2).sum())
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q.to(torch.int32)
    inv = torch.argsort(perm)
    g_idx = (torch.arange(K) // group_size)[inv] if act_order else torch.arange(K) // group_size
    return GPTQResult(q[:, inv].contiguous(), zeros.to(torch.int32), scales, g_idx.to(torch.int32),
                      error / N)


def rtn_quantize(w: Tensor, bits: int = 4, group_size: int = 128) -> GPTQResult:
    """Round-to-nearest with the same quantizer (the baseline GPTQ is measured against)."""
    maxq = 2 ** bits - 1
    W = w.detach().float()
    N, K = W.shape
    G = -(-K // group_size)
    q = torch.zeros(N, K, dtype=torch.int32)
    scales, zeros = torch.zeros(G, N), torch.zeros(G, N)
    for g in range(G):
        cols = slice(g * group_size, min(K, (g + 1) * group_size))
        scale, zero = _group_params(W[:, cols], maxq)
        scales[g], zeros[g] = scale, zero
        q[:, cols] = torch.clamp(torch.round(W[:, cols] / scale[:, None]) + zero[:, None], 0, maxq).int()
    return GPTQResult(q, zeros.to(torch.int32), scales, (torch.arange(K) // group_size).int(), 0.0)
