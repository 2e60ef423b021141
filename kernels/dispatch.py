"""Which kernels run a quantized linear layer, per device.

The engine asks once, at load:

    prepare, linear = get_kernels("int4", backend_for(device))
    prepared = prepare(stored_tensors, K=in_features, group_size=128, act_dtype=torch.bfloat16)
    ...
    y = linear(x, prepared, bias)          # per call: only launches kernels

Every format and backend has this same signature, so callers never branch on either. The
formats and their kernels are records in kernels/formats.py; `stored_tensors` uses the
storage names of kernels/reference.py.

Backends: "cpu" (kernels/cpu.py and nibble's native kernels) on CPU; "triton" (kernels/triton/)
on CUDA, where the dequantize-GEMM formats' prepare also measures, per batch-size bucket,
whether the fused kernel or dequantize-then-torch.matmul is faster; "reference"
(kernels/reference.py) on CUDA without Triton, and in tests. What prepare returns names the
path a call with M rows takes: `prepared.path(M)` ("cpu-fused", "cpu-native", "cpu-dense",
"reference", "w8a8-gemm", or the Triton plan's "tiled", "split-k", "gemv",
"dequant-matmul"), for logs and metrics.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal

import torch

from kernels import formats
from kernels.formats import LinearFn, PrepareFn

log = logging.getLogger("nibble.kernels")

Backend = Literal["cpu", "reference", "triton"]

BACKENDS: tuple[str, ...] = ("cpu", "reference", "triton")
__all__ = ["BACKENDS", "LinearFn", "PrepareFn", "backend_for", "get_kernels"]


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


def get_kernels(fmt: str, backend: str) -> tuple[PrepareFn, LinearFn]:
    """(prepare, linear) for a storage format on a backend; see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    k = formats.get(fmt).kernels(backend)
    return k.prepare, k.linear
