"""QuantLinear: a linear layer whose storage and compute belong to a QuantMethod.

Fused projections (q|k|v, gate|up) arrive from checkpoints as separate shards; the layer
collects them and quantizes once when the last shard is in, so no more than one fused
weight is ever held in 16/32-bit at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.config import QuantSpec
from engine.errors import CheckpointError
from engine.quant import StoredMethod, make_method


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        shard_sizes: tuple[int, ...],
        spec: QuantSpec,
        act_dtype: torch.dtype,
        bias: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = shard_sizes
        self.out_features = sum(shard_sizes)
        self.spec = spec
        self.method: StoredMethod = make_method(spec, in_features, self.out_features, act_dtype)
        self.has_bias = bias
        self.bias: Tensor | None = None
        self.act_dtype = act_dtype
        # act-order GPTQ: the stored columns are the inputs in this order (x[..., perm] @ W.T)
        self.input_perm: Tensor | None = None
        self._pending: dict[tuple[str, int], Tensor] = {}

    def load_shard(self, kind: str, shard: int, tensor: Tensor) -> None:
        """Takes one shard of the 16/32-bit weight ([n_shard, K]) or bias ([n_shard])."""
        want = (self.shard_sizes[shard], self.in_features) if kind == "weight" else (
            self.shard_sizes[shard],)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{kind} shard {shard} has shape {tuple(tensor.shape)}, expected {want}")
        self._pending[(kind, shard)] = tensor
        self._flush(kind)

    def load_stored_shard(self, shard: int, tensors: dict[str, Tensor],
                          input_perm: Tensor | None = None) -> None:
        """One shard's stored tensors from a pre-quantized checkpoint that keeps q, k and v
        (gate and up) apart; joined along the output features once every shard is in.
        `input_perm`: the input order of the stored columns (act-order GPTQ); shards joined
        into one module must share it."""
        self._pending[("perm", shard)] = input_perm
        self._pending[("stored", shard)] = tensors
        self._flush("stored")

    def _flush(self, kind: str) -> None:
        """Once every shard of `kind` is in: join them along the output features and load."""
        shards = [self._pending.get((kind, i)) for i in range(len(self.shard_sizes))]
        if any(s is None for s in shards):
            return
        for i in range(len(shards)):
            del self._pending[(kind, i)]
        if kind == "stored":
            perms = [self._pending.pop(("perm", i)) for i in range(len(shards))]
            if any(p is None for p in perms) != all(p is None for p in perms) or any(
                    p is not None and not torch.equal(p, perms[0]) for p in perms):
                raise CheckpointError(
                    "the shards of one fused module (q/k/v or gate/up) were stored with different "
                    "act-order column orders; nibble joins them and needs one input order")
            self.input_perm = perms[0]
            self.method.load({k: torch.cat([s[k] for s in shards], 0) for k in shards[0]})
            return
        full = shards[0] if len(shards) == 1 else torch.cat(shards, 0)
        if kind == "weight":
            self.method.load(self.method.quantize(full))
        else:
            self.bias = full.to(self.act_dtype)

    def load_quantized(self, tensors: dict[str, Tensor], bias: Tensor | None,
                       input_perm: Tensor | None = None) -> None:
        """Stored tensors from a pre-quantized checkpoint: no quantization happens."""
        self.method.load(tensors)
        self.input_perm = input_perm
        if bias is not None:
            self.bias = bias.to(self.act_dtype)

    @property
    def loaded(self) -> bool:
        return bool(self.method.stored_bytes) and (self.bias is not None or not self.has_bias)

    def prepare(self, device: torch.device, batch_invariant: bool = False) -> None:
        self.method.prepare(device, batch_invariant)
        if self.bias is not None:
            self.bias = self.bias.to(device)
        if self.input_perm is not None:
            self.input_perm = self.input_perm.to(device=device, dtype=torch.int64)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.act_dtype)
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        return self.method.apply(x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.spec}"
