"""The quantization seam: a QuantMethod owns a linear layer's storage and compute.

A layer owns shapes; it asks the registry for a method and then only calls ``quantize``/
``load``, ``prepare`` and ``apply``. Layouts change once, in ``prepare``; ``apply`` only
launches kernels.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from engine.config import QuantSpec
from engine.errors import CheckpointError


@runtime_checkable
class QuantMethod(Protocol):
    name: str

    def quantize(self, w: Tensor) -> dict[str, Tensor]: ...  # [N, K] float -> stored tensors
    def load(self, tensors: dict[str, Tensor]) -> None: ...  # stored tensors from quantize or a file
    # repack once for the kernel in use; batch_invariant: a row's result must not depend on
    # how many rows share the call (one kernel path for every batch size)
    def prepare(self, device: torch.device, batch_invariant: bool = False) -> None: ...
    def apply(self, x: Tensor, bias: Tensor | None) -> Tensor: ...  # [..., K] -> [..., N]
    def dequantize(self) -> Tensor: ...  # [N, K] float32, before prepare()


class StoredMethod:
    """Shared bookkeeping: the stored tensors, their byte count and a config for checkpoints."""

    name: str
    tensor_names: tuple[str, ...]
    optional_tensor_names: tuple[str, ...] = ()  # stored when present (a calibrated scale)

    def __init__(
        self, spec: QuantSpec, in_features: int, out_features: int, act_dtype: torch.dtype
    ):
        self.spec = spec
        self.act_dtype = act_dtype
        self.in_features = in_features
        self.out_features = out_features
        self.stored: dict[str, Tensor] = {}
        self.stored_bytes = 0

    def load(self, tensors: dict[str, Tensor]) -> None:
        missing = [k for k in self.tensor_names if k not in tensors]
        extra = [k for k in tensors
                 if k not in self.tensor_names and k not in self.optional_tensor_names]
        if missing or extra:
            raise CheckpointError(
                f"{self.name} weight expects tensors {list(self.tensor_names)}; "
                f"missing {missing}, unexpected {extra}"
            )
        self.check_shapes(tensors)
        self.stored = {k: tensors[k] for k in (*self.tensor_names, *self.optional_tensor_names)
                       if k in tensors}
        self.stored_bytes = sum(t.numel() * t.element_size() for t in self.stored.values())

    def check_shapes(self, tensors: dict[str, Tensor]) -> None:
        want = self.expected_shapes()
        for key, shape in want.items():
            if key in tensors and tuple(tensors[key].shape) != shape:
                raise CheckpointError(
                    f"{self.name} tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                    f"expected {shape} for a {self.out_features}x{self.in_features} weight"
                )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def require_stored(self) -> dict[str, Tensor]:
        if not self.stored:
            raise RuntimeError(
                f"{self.name}: the stored tensors were released by prepare(); "
                "dequantize or save before preparing"
            )
        return self.stored

    def config(self) -> dict:
        """What a checkpoint's JSON records to rebuild this method."""
        return {"format": str(self.spec)}

    def num_groups(self) -> int:
        g = self.spec.group_size
        return -(-self.in_features // g)


class PackedMethod(StoredMethod):
    """A low-bit format computed by kernels/: prepare repacks through the dispatcher once,
    apply only launches the chosen kernel. Its stored tensors are its record's
    (kernels/formats.py)."""

    @property
    def record(self):
        from kernels import formats

        return formats.get(self.name)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.record.tensors

    @property
    def optional_tensor_names(self) -> tuple[str, ...]:
        return self.record.optional_tensors

    def prepare(self, device: torch.device, batch_invariant: bool = False) -> None:
        from kernels import dispatch

        self._backend = dispatch.backend_for(device)
        prepare_fn, self._linear = dispatch.get_kernels(self.name, self._backend)
        tensors = {k: v.to(device) for k, v in self.stored.items()}
        self._prepared = prepare_fn(tensors, K=self.in_features, group_size=self.spec.group_size,
                                    act_dtype=self.act_dtype, batch_invariant=batch_invariant)
        self.stored = {}  # the kernel layout replaces them; no second copy stays in memory

    def apply(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return self._linear(x, self._prepared, bias)

    def kernel_path(self, M: int) -> str:
        """Which kernel path serves a call with M rows (a label for logs and metrics)."""
        return self._prepared.path(M)

    def config(self) -> dict:
        out = {"format": str(self.spec)}
        if self.spec.group_size:
            out["group_size"] = self.spec.group_size
        if self.spec.symmetric and self.record.sym_option:
            out["symmetric"] = True
        return out


_REGISTRY: dict[str, type] = {}


def register(*names: str):
    def wrap(cls: type) -> type:
        for n in names:
            _REGISTRY[n] = cls
        return cls

    return wrap


def make_method(
    spec: QuantSpec, in_features: int, out_features: int, act_dtype: torch.dtype
) -> StoredMethod:
    """The method for one linear layer; the registry is filled by importing engine.quant."""
    return _REGISTRY[spec.format](spec, in_features, out_features, act_dtype)
