"""Storage formats, one record each: everything the engine and the kernels need to know about
a format lives in its `Format`, and the tables elsewhere (the `--quant` spellings in
engine/config.py, the kernel table in kernels/dispatch.py, the memory estimate in
engine/plan.py) are read off these records.

A new format is a new module that builds a `Format` and calls `register` (w8a8.py; imported
at the end of this file), plus a QuantMethod registered in engine/quant/ for its quantizer;
the tables need no edit. (Its CPU layout joins the fused decode step by answering
`fused_step()`, as w8a8's does.)

Every backend's kernels have one signature, so callers never branch on the format:

    prepared = fmt.kernels("cpu").prepare(stored, K=K, group_size=g, act_dtype=torch.bfloat16)
    y = fmt.kernels("cpu").linear(x, prepared, bias)
    label = prepared.path(M)   # which path a call with M rows takes, for logs and metrics

`stored` uses the storage names of kernels/reference.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from kernels import cpu, reference
from kernels.triton import layout as triton_layout


class PrepareFn(Protocol):
    def __call__(self, tensors: Mapping[str, Tensor], *, K: int, group_size: int | None,
                 act_dtype: torch.dtype, batch_invariant: bool = False) -> Any: ...


class LinearFn(Protocol):
    def __call__(self, x: Tensor, prepared: Any, bias: Tensor | None = None) -> Tensor: ...


@dataclass(frozen=True)
class Kernels:
    """One backend's kernels for a format: prepare once at load, linear per call."""

    prepare: PrepareFn
    linear: LinearFn


# (N, K, group_size, act_dtype) -> bytes, or {(tag, shape): bytes} of shared scratch buffers
BytesFn = Callable[[int, int, int | None, torch.dtype], int]
ScratchFn = Callable[[int, int, int | None, torch.dtype], dict[tuple, int]]


@dataclass(frozen=True)
class Format:
    """A storage format.

    name: the registry name (QuantSpec.format), family: the word of `--quant` that selects
    it. tensors / optional_tensors: the stored tensors' names. grouped: scales per group of
    inputs (the kernels take group_size), default_group: the group when the spelling gives
    none; group_format: the
    format that a `-gN` spelling selects instead of this one (int8 -> int8g); symmetric: the
    default rounding, sym_option: whether `-sym` is accepted. packed: two codes per byte
    (what the Triton tuner's traffic model counts). backends: "reference", "cpu", "triton"
    -> Kernels. cpu_bytes / cpu_scratch / triton_bytes: the resident bytes of the prepared
    layouts and the CPU dense path's shared buffers, from shapes alone.
    """

    name: str
    family: str
    tensors: tuple[str, ...]
    backends: Mapping[str, Kernels]
    cpu_bytes: BytesFn
    triton_bytes: BytesFn
    cpu_scratch: ScratchFn = cpu.no_scratch
    optional_tensors: tuple[str, ...] = ()
    grouped: bool = False
    default_group: int | None = None
    group_format: str | None = None
    symmetric: bool = False
    sym_option: bool = False
    packed: bool = False
    examples: tuple[str, ...] = ()  # spellings of `--quant` that select it, for help and errors
    triton_layout: triton_layout.TritonLayout | None = field(default=None, repr=False)

    def kernels(self, backend: str) -> Kernels:
        if backend not in self.backends:
            raise ValueError(f"no {backend!r} kernels for format {self.name!r}; "
                             f"valid: {', '.join(self.backends)}")
        return self.backends[backend]


_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    if name not in _FORMATS:
        raise ValueError(f"unknown quantized format {name!r}; valid: {', '.join(_FORMATS)}")
    return _FORMATS[name]


def by_family(family: str) -> Format | None:
    """The format a `--quant` word selects without options, or None."""
    return next((f for f in _FORMATS.values() if f.family == family and f.name == family), None)


def examples() -> list[str]:
    return [e for f in _FORMATS.values() for e in f.examples]


# --- reference backend: keep the stored tensors, compute through kernels/reference.py ---------


@dataclass
class Stored:
    """The reference backend's prepared form: the stored tensors as they are."""

    tensors: dict[str, Tensor]
    group_size: int | None

    def path(self, M: int) -> str:
        return "reference"


def _stored(tensors: Mapping[str, Tensor], *, K: int, group_size: int | None,
            act_dtype: torch.dtype, batch_invariant: bool = False) -> Stored:
    """act_dtype is unused: the reference returns x's dtype."""
    return Stored(dict(tensors), group_size)


def reference_kernels(fn: Callable[..., Tensor], tensors: tuple[str, ...],
                      grouped: bool) -> Kernels:
    """Kernels from a kernels/reference.py linear, fn(x, *tensors in this order (None for an
    optional one not stored)[, group_size if grouped], bias)."""
    def linear(x: Tensor, p: Stored, bias: Tensor | None = None) -> Tensor:
        extra = (p.group_size,) if grouped else ()
        return fn(x, *(p.tensors.get(k) for k in tensors), *extra, bias)

    return Kernels(_stored, linear)


# --- cpu backend: kernels/cpu.py's prepares under the common signature -------------------------


def _need_group(fmt: str, group_size: int | None) -> int:
    if group_size is None:
        raise ValueError(f"{fmt} is group-wise: pass group_size (32, 64 or 128)")
    return group_size


def _cpu_int8(t: Mapping[str, Tensor], *, K: int, group_size: int | None,
              act_dtype: torch.dtype, batch_invariant: bool = False) -> cpu.CpuLayout:
    return cpu.int8_prepare(t["qweight"], t["scales"], act_dtype, batch_invariant)


def _cpu_int4(t: Mapping[str, Tensor], *, K: int, group_size: int | None,
              act_dtype: torch.dtype, batch_invariant: bool = False) -> cpu.CpuLayout:
    g = _need_group("int4", group_size)
    return cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], g, K, act_dtype,
                            batch_invariant)


def _cpu_int8g(t: Mapping[str, Tensor], *, K: int, group_size: int | None,
               act_dtype: torch.dtype, batch_invariant: bool = False) -> cpu.CpuLayout:
    g = _need_group("int8g", group_size)
    return cpu.int8g_prepare(t["qweight"], t["scales"], t["zeros"], g, K, act_dtype,
                             batch_invariant)


def _cpu_nf4(t: Mapping[str, Tensor], *, K: int, group_size: int | None,
             act_dtype: torch.dtype, batch_invariant: bool = False) -> cpu.CpuLayout:
    g = _need_group("nf4", group_size)
    return cpu.nf4_prepare(t["qweight"], t["absmax"], g, K, act_dtype, batch_invariant)


# --- triton backend (kernels/triton/qgemm.py): repack once, tune per batch-size bucket ---------


@dataclass
class TritonPrepared:
    """The repacked weights (layout.py), the kernel's FMT code and sizes, and the plan: one
    launch config per batch-size bucket (tuning.py)."""

    w: dict[str, Tensor]
    code: int
    group_size: int
    K: int
    N: int
    plan: list

    def path(self, M: int) -> str:
        from kernels.triton import tuning

        return self.plan[tuning.bucket_index(M)].label


def qgemm_kernels(name: str, lay: triton_layout.TritonLayout, grouped: bool,
                  packed: bool) -> Kernels:
    """Triton kernels for a format of kernels/triton/qgemm.py: its prepare also measures, per
    batch-size bucket, whether the fused kernel or dequantize-then-torch.matmul is faster, and
    linear picks by the number of rows."""
    def prepare(tensors: Mapping[str, Tensor], *, K: int, group_size: int | None,
                act_dtype: torch.dtype, batch_invariant: bool = False) -> TritonPrepared:
        from kernels.triton import qgemm, tuning

        g = _need_group(name, group_size) if grouped else 0
        N = tensors["qweight"].shape[0]
        w = lay.repack(tensors, K, g, act_dtype)

        def run(x: Tensor, cfg: qgemm.KernelConfig) -> Tensor:
            return qgemm.linear(x, w, lay.code, g, N, None, cfg)

        key = tuning.shape_key(name, K, N, g, act_dtype)
        plan = tuning.plan_for(key, run, K, act_dtype, w["qweight"].device, packed=packed)
        if batch_invariant:  # one launch config for every M: a row never depends on its batch
            plan = [plan[-1]] * len(plan)
        return TritonPrepared(w, lay.code, g, K, N, plan)

    def linear(x: Tensor, p: TritonPrepared, bias: Tensor | None = None) -> Tensor:
        from kernels.triton import qgemm, tuning

        x2 = x.reshape(-1, p.K)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        cfg = p.plan[tuning.bucket_index(x2.shape[0])]
        y = qgemm.linear(x2, p.w, p.code, p.group_size, p.N, bias, cfg)
        return y.view(*x.shape[:-1], p.N)

    return Kernels(prepare, linear)


def _record(name: str, family: str, tensors: tuple[str, ...], ref: Callable[..., Tensor],
            cpu_prepare: PrepareFn, cpu_bytes: BytesFn, lay: triton_layout.TritonLayout,
            **kw: Any) -> Format:
    """A format computed by kernels/cpu.py, kernels/triton/qgemm.py and the reference."""
    return register(Format(
        name, family, tensors,
        backends={"reference": reference_kernels(ref, tensors, kw.get("grouped", False)),
                  "cpu": Kernels(cpu_prepare, cpu.linear),
                  "triton": qgemm_kernels(name, lay, kw.get("grouped", False),
                                          kw.get("packed", False))},
        cpu_bytes=cpu_bytes, triton_bytes=lay.nbytes, triton_layout=lay, **kw))


INT8 = _record("int8", "int8", ("qweight", "scales"), reference.int8_linear, _cpu_int8,
               cpu.int8_bytes, triton_layout.INT8, cpu_scratch=cpu.int8_scratch,
               group_format="int8g", symmetric=True, examples=("int8",))
INT8G = _record("int8g", "int8", ("qweight", "scales", "zeros"), reference.int8g_linear,
                _cpu_int8g, cpu.int8g_bytes, triton_layout.INT8G, cpu_scratch=cpu.int8g_scratch,
                grouped=True, examples=("int8-g32",))
INT4 = _record("int4", "int4", ("qweight", "scales", "zeros"), reference.int4_linear, _cpu_int4,
               cpu.int4_bytes, triton_layout.INT4, cpu_scratch=cpu.int4_scratch,
               grouped=True, default_group=128, sym_option=True, packed=True,
               examples=("int4", "int4-g32", "int4-g64", "int4-sym"))
NF4 = _record("nf4", "nf4", ("qweight", "absmax"), reference.nf4_linear, _cpu_nf4,
              cpu.nf4_bytes, triton_layout.NF4, grouped=True, default_group=64, packed=True,
              examples=("nf4", "nf4-g32"))

# Formats defined in their own modules register on import.
from kernels import w8a8  # noqa: E402, F401
