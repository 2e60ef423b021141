"""Which kernels run a quantized linear layer, per device.

The engine asks once, at load:

    prepare, linear = get_kernels("int4", backend_for(device))
    prepared = prepare(stored_tensors, K=in_features, group_size=128, act_dtype=torch.bfloat16)
    ...
    y = linear(x, prepared, bias)          # per call: only launches kernels

Every format and backend has this same signature, so callers never branch on either.
`stored_tensors` uses the storage names of kernels/reference.py: "qweight", "scales" (int8,
int8g, int4), "zeros" (int8g, int4), "absmax" (nf4).

Backends: "cpu" (PyTorch's fused CPU ops, kernels/cpu.py) on CPU; "triton" (kernels/triton/)
on CUDA, where its prepare also measures, per batch-size bucket, whether the fused kernel or
dequantize-then-torch.matmul is faster, and `linear` picks by the number of rows;
"reference" (kernels/reference.py) on CUDA without Triton, and in tests.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from kernels import cpu, reference

log = logging.getLogger("nibble.kernels")

Format = Literal["int8", "int8g", "int4", "nf4"]
Backend = Literal["cpu", "reference", "triton"]

FORMATS: tuple[str, ...] = ("int8", "int8g", "int4", "nf4")
BACKENDS: tuple[str, ...] = ("cpu", "reference", "triton")

# What prepare returns and linear reads: tensors plus sizes (and, for triton, the plan).
Prepared = dict[str, Any]


class PrepareFn(Protocol):
    def __call__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        K: int,
        group_size: int | None,
        act_dtype: torch.dtype,
        batch_invariant: bool = False,
    ) -> Prepared: ...


class LinearFn(Protocol):
    def __call__(self, x: Tensor, prepared: Prepared, bias: Tensor | None = None) -> Tensor: ...


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports; says once (not per layer) what its absence costs."""
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("Triton is not installed: quantized layers on CUDA run the slow reference "
                    "kernels (pip install 'nibble[gpu]')")
        return False
    return True


def backend_for(device: torch.device | str) -> Backend:
    """The backend for tensors on `device`: "cpu" on CPU; "triton" on CUDA ("reference", with a
    warning, where Triton is not installed). $NIBBLE_KERNELS names one to force instead (for
    comparisons, and to run the Triton kernels on CPU under TRITON_INTERPRET=1)."""
    forced = os.environ.get("NIBBLE_KERNELS")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"NIBBLE_KERNELS={forced!r} is not a kernel backend; "
                             f"valid: {', '.join(BACKENDS)}")
        return forced  # type: ignore[return-value]
    kind = torch.device(device).type
    if kind == "cpu":
        return "cpu"
    if kind == "cuda":
        return "triton" if triton_available() else "reference"
    raise ValueError(f"no quantized kernels for device type {kind!r}; use 'cpu' or 'cuda'")


def _need_group(fmt: str, group_size: int | None) -> int:
    if group_size is None:
        raise ValueError(f"{fmt} is group-wise: pass group_size (32, 64 or 128)")
    return group_size


# --- reference backend: keep the stored tensors, compute through reference.*_linear -----------


def _ref_prepare(
    tensors: Mapping[str, Tensor], *, K: int, group_size: int | None, act_dtype: torch.dtype,
    batch_invariant: bool = False,
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


def _ref_int8g(x: Tensor, p: Prepared, bias: Tensor | None = None) -> Tensor:
    return reference.int8g_linear(x, p["qweight"], p["scales"], p["zeros"], p["group_size"], bias)


def _ref_nf4(x: Tensor, p: Prepared, bias: Tensor | None = None) -> Tensor:
    return reference.nf4_linear(x, p["qweight"], p["absmax"], p["group_size"], bias)


# --- cpu backend: adapt cpu.*_prepare to the common signature ---------------------------------


def _cpu_int8_prepare(
    tensors: Mapping[str, Tensor], *, K: int, group_size: int | None, act_dtype: torch.dtype,
    batch_invariant: bool = False,
) -> Prepared:
    return cpu.int8_prepare(tensors["qweight"], tensors["scales"], act_dtype, batch_invariant)


def _cpu_int4_prepare(
    tensors: Mapping[str, Tensor], *, K: int, group_size: int | None, act_dtype: torch.dtype,
    batch_invariant: bool = False,
) -> Prepared:
    g = _need_group("int4", group_size)
    t = tensors
    return cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], g, K, act_dtype,
                            batch_invariant)


def _cpu_int8g_prepare(
    tensors: Mapping[str, Tensor], *, K: int, group_size: int | None, act_dtype: torch.dtype,
    batch_invariant: bool = False,
) -> Prepared:
    g = _need_group("int8g", group_size)
    t = tensors
    return cpu.int8g_prepare(t["qweight"], t["scales"], t["zeros"], g, K, act_dtype,
                             batch_invariant)


def _cpu_nf4_prepare(
    tensors: Mapping[str, Tensor], *, K: int, group_size: int | None, act_dtype: torch.dtype,
    batch_invariant: bool = False,
) -> Prepared:
    g = _need_group("nf4", group_size)
    return cpu.nf4_prepare(tensors["qweight"], tensors["absmax"], g, K, act_dtype,
                           batch_invariant)


# --- triton backend: repack once, tune per batch-size bucket, pick the path per call -----------


def _triton_prepare(fmt: str) -> PrepareFn:
    def prepare(tensors: Mapping[str, Tensor], *, K: int, group_size: int | None,
                act_dtype: torch.dtype, batch_invariant: bool = False) -> Prepared:
        from kernels.triton import layout, qgemm, tuning

        g = _need_group(fmt, group_size) if fmt != "int8" else 0
        N, code = tensors["qweight"].shape[0], layout.FORMAT_CODES[fmt]
        w = layout.repack(fmt, tensors, K, g, act_dtype)
        device = w["qweight"].device

        def run(x: Tensor, cfg: qgemm.KernelConfig) -> Tensor:
            return qgemm.linear(x, w, code, g, N, None, cfg)

        key = tuning.shape_key(fmt, K, N, g, act_dtype)
        plan = tuning.plan_for(key, run, K, act_dtype, device, packed=fmt in ("int4", "nf4"))
        if batch_invariant:  # one launch config for every M: a row never depends on its batch
            plan = [plan[-1]] * len(plan)
        return {"w": w, "fmt": code, "group_size": g, "K": K, "N": N, "plan": plan}

    return prepare


def _triton_linear(x: Tensor, p: Prepared, bias: Tensor | None = None) -> Tensor:
    from kernels.triton import qgemm, tuning

    K, N = p["K"], p["N"]
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    cfg = p["plan"][tuning.bucket_index(x2.shape[0])]
    y = qgemm.linear(x2, p["w"], p["fmt"], p["group_size"], N, bias, cfg)
    return y.view(*x.shape[:-1], N)


def path_label(backend: str, prepared: Prepared, M: int) -> str:
    """The name of the path a call with M rows takes, for logs and metrics: "cpu-fused",
    "cpu-dense", "reference", or the Triton plan's "tiled", "split-k", "gemv" or
    "dequant-matmul"."""
    if backend == "triton":
        from kernels.triton import tuning

        return prepared["plan"][tuning.bucket_index(M)].label
    if backend == "cpu":
        return cpu.path(prepared, M)
    return backend


_KERNELS: dict[tuple[str, str], tuple[PrepareFn, LinearFn]] = {
    ("int8", "reference"): (_ref_prepare, _ref_int8),
    ("int4", "reference"): (_ref_prepare, _ref_int4),
    ("int8g", "reference"): (_ref_prepare, _ref_int8g),
    ("nf4", "reference"): (_ref_prepare, _ref_nf4),
    ("int8", "cpu"): (_cpu_int8_prepare, cpu.int8_linear),
    ("int4", "cpu"): (_cpu_int4_prepare, cpu.int4_linear),
    ("int8g", "cpu"): (_cpu_int8g_prepare, cpu.int8g_linear),
    ("nf4", "cpu"): (_cpu_nf4_prepare, cpu.nf4_linear),
    ("int8", "triton"): (_triton_prepare("int8"), _triton_linear),
    ("int4", "triton"): (_triton_prepare("int4"), _triton_linear),
    ("int8g", "triton"): (_triton_prepare("int8g"), _triton_linear),
    ("nf4", "triton"): (_triton_prepare("nf4"), _triton_linear),
}


def get_kernels(fmt: str, backend: str) -> tuple[PrepareFn, LinearFn]:
    """(prepare, linear) for a storage format on a backend; see the module docstring."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; valid: {', '.join(FORMATS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return _KERNELS[(fmt, backend)]
