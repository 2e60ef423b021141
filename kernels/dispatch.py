"""Which kernels run a quantized linear layer, per device.

The engine asks once, at load:

    prepare, linear = get_kernels("int4", backend_for(device))
    prepared = prepare(stored_tensors, K=in_features, group_size=128, act_dtype=torch.bfloat16)
    ...
    y = linear(x, prepared, bias)          # per call: only launches kernels

Every format and backend has this same signature, so callers never branch on either.
`stored_tensors` uses the storage names of kernels/reference.py: "qweight", "scales" (int8,
int4), "zeros" (int4), "absmax" (nf4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

import torch
from torch import Tensor

from kernels import cpu, reference
from kernels.cpu import Prepared

Format = Literal["int8", "int4", "nf4"]
Backend = Literal["cpu", "reference"]  # "triton" joins when kernels/triton/ lands

FORMATS: tuple[str, ...] = ("int8", "int4", "nf4")
BACKENDS: tuple[str, ...] = ("cpu", "reference")


class PrepareFn(Protocol):
    def __call__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        K: int,
        group_size: int | None,
        act_dtype: torch.dtype,
    ) -> Prepared: ...


class LinearFn(Protocol):
    def __call__(self, x: Tensor, prepared: Prepared, bias: Tensor | None = None) -> Tensor: ...


def backend_for(device: torch.device | str) -> Backend:
    """The backend for tensors on `device`: "cpu" on CPU; "reference" on CUDA until the Triton
    kernels exist (then return "triton" here)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "cpu"
    if kind == "cuda":
        return "reference"
    raise ValueError(f"no quantized kernels for device type {kind!r}; use 'cpu' or 'cuda'")


def _need_group(fmt: str, group_size: int | None) -> int:
    if group_size is None:
        raise ValueError(f"{fmt} is group-wise: pass group_size (32, 64 or 128)")
    return group_size


# --- reference backend: keep the stored tensors, compute through reference.*_linear -----------


def _ref_prepare(
    tensors: Mapping[str, Tensor], *, K: int, group_size: int | None, act_dtype: torch.dtype
) -> Prepared:
    """Stores the tensors as they are; act_dtype is unused (the reference returns x's dtype)."""
    prepared: Prepared = dict(tensors)
    if group_size is not None:
        prepared["group_size"] = group_size
    return prepared


def _ref_int8(x: Tensor, p: Prepared, bias: Tensor | None = None) -> Tensor:
    return reference.int8_linear(x, p["qweight"], p["scales"], bias)


def _ref_int4(x: Tensor, p: Prepared, bias: Tensor | None = None) -> Tensor:
    return reference.int4_linear(x, p["qweight"], p["scales"], p["zeros"], p["group_size"], bias)


def _ref_nf4(x: Tensor, p: Prepared, bias: Tensor | None = None) -> Tensor:
    return reference.nf4_linear(x, p["qweight"], p["absmax"], p["group_size"], bias)


# --- cpu backend: adapt cpu.*_prepare to the common signature ---------------------------------


def _cpu_int8_prepare(
    tensors: Mapping[str, Tensor], *, K: int, group_size: int | None, act_dtype: torch.dtype
) -> Prepared:
    return cpu.int8_prepare(tensors["qweight"], tensors["scales"], act_dtype)


def _cpu_int4_prepare(
    tensors: Mapping[str, Tensor], *, K: int, group_size: int | None, act_dtype: torch.dtype
) -> Prepared:
    g = _need_group("int4", group_size)
    t = tensors
    return cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], g, K, act_dtype)


def _cpu_nf4_prepare(
    tensors: Mapping[str, Tensor], *, K: int, group_size: int | None, act_dtype: torch.dtype
) -> Prepared:
    g = _need_group("nf4", group_size)
    return cpu.nf4_prepare(tensors["qweight"], tensors["absmax"], g, K, act_dtype)


_KERNELS: dict[tuple[str, str], tuple[PrepareFn, LinearFn]] = {
    ("int8", "reference"): (_ref_prepare, _ref_int8),
    ("int4", "reference"): (_ref_prepare, _ref_int4),
    ("nf4", "reference"): (_ref_prepare, _ref_nf4),
    ("int8", "cpu"): (_cpu_int8_prepare, cpu.int8_linear),
    ("int4", "cpu"): (_cpu_int4_prepare, cpu.int4_linear),
    ("nf4", "cpu"): (_cpu_nf4_prepare, cpu.nf4_linear),
    # ("int4", "triton"), ...: register the kernels/triton/ launchers here.
}


def get_kernels(fmt: str, backend: str) -> tuple[PrepareFn, LinearFn]:
    """(prepare, linear) for a storage format on a backend; see the module docstring."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; valid: {', '.join(FORMATS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return _KERNELS[(fmt, backend)]
