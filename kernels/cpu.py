"""CPU kernels: PyTorch's fused low-bit ops, with a one-time prepare per format.

Each format has `<fmt>_prepare(...)`, run once at load, which repacks the stored tensors
(kernels/reference.py describes the formats) into one of the typed layouts below (a
`CpuLayout`: `Dense`, `Fp16Gemm`, `Int4Op`, `Int4Native`, `Int8Op`, `Int8Group`); per call
`linear(x, prepared, bias)` (the layout's own `linear`) only launches kernels.  x is [..., K]
in the activation dtype given to prepare; the output is [..., N] in that dtype.

Op constraints (torch 2.13 CPU, probed on AVX512 and checked by tests/kernels/test_cpu.py):

- `aten._weight_int4pack_mm_for_cpu(x [M, K], packed, qGroupSize, scales_and_zeros)`:
  W = (q - 8) * scale + zero.  qGroupSize in {32, 64, 128, 256}, K % qGroupSize == 0,
  N % 16 == 0 (checked by `_convert_weight_to_int4pack_for_cpu`), x contiguous,
  scales_and_zeros [K / qGroupSize, N, 2] in x's dtype; bf16, fp16 and fp32 all work.  It
  accumulates in fp32 and rounds once (bf16 output equals the fp32 result rounded), and a row's
  output is bitwise the same whatever the batch.  innerKTiles is ignored by the CPU packer
  (1, 2, 4 and 8 give identical bytes).
- `aten._weight_int8pack_mm(x [M, K], qweight int8 [N, K], scales [N])`: scales in x's dtype.
  With bf16 x it needs K % 16 == 0: otherwise it returns garbage (M = 1) or segfaults
  (M > 1).  fp16 and fp32 work for any K.  Bitwise batch invariant.

How shapes the ops cannot serve are handled (decided at prepare, never per call):

- int4 ragged groups: the kernel group becomes kg = gcd(K, g) and each scale/zero column is
  repeated g/kg times (the ragged last group covers a whole number of kernel groups since
  kg | K), so the dequantized values are identical.  N % 16 != 0: rows are padded with zero
  scales and zeros and the output is sliced.  kg < 32 (K % 32 != 0, odd K included): dense.
- int8 with bf16 activations and K % 16 != 0: dense.
- "dense" = dequantize once with the reference into the activation dtype, then F.linear.
  Correct and fast but it holds 16-bit weights; no layer of the supported models needs it
  (their K are multiples of 64).

nf4 has no fused op. benchmarks/nf4_cpu.py times the candidates (results in
benchmarks/results/nf4-cpu-2026-11-23.json; 2-core AMD EPYC with AVX512-BF16, torch 2.13,
bf16, group 64, median microseconds), K x N:

    candidate                       576x960   576x576   576x3072  1536x576
    M = 1 (decode)
      unpack + index + scale + mm      2897      1034       6316      2968
      byte->pair table + scale + mm    1693       604       5371      1582
      per-call x-table gather (gemv)    988       458       2582      1453
      dequantize once, F.linear          87        45        215        82
      (int4 fused op, for scale)         38        26        114        50
    M = 64 (prefill)
      unpack + index + scale + mm      2076      1938       7223      3719
      byte->pair table + scale + mm    1266      1238       4357      2011
      dequantize once, F.linear         369       236       1189       589
      (int4 fused op, for scale)        846       505       2674      1600

Chosen: dequantize once at prepare, F.linear per call: 5-30x faster than any path that
keeps 4-bit codes resident, because CPU gathers do not vectorize and every call would
re-expand N*K values; the cost is 16-bit weight memory for nf4 layers on CPU.

Batch-size dispatch (int4, int8, and w8a8 in kernels/w8a8.py). The fused ops scale like a GEMV: each row re-reads the
weights, so a 512-row prefill chunk costs about 512 single-row calls. Past some M it is
faster to dequantize the layer per call into an fp32 scratch buffer (shared by all layers of
a shape, so no weight copy stays resident) and run one fp32 GEMM that reuses each weight
across rows. Where that crossover lies depends on the CPU, so prepare measures both paths at
M = 64, 128, 256 and 512 on the layer's shape and records the smallest M from which the dense
path wins: once per shape per machine, stored for later processes (kernels/tuning_cache.py;
NIBBLE_RETUNE=1 measures again, NIBBLE_TUNE=0 times nothing and keeps the fused path).
Measured on a 2-core AVX2 EPYC, 576x1536, int4 g64: fused 2.4 / 4.8 / 9.4 / 18.6 ms vs dense
2.3 / 3.0 / 4.6 / 8.1 ms at M = 64 / 128 / 256 / 512. The two paths round differently, so a
row's result then depends on how many rows share its call: prepare(batch_invariant=True)
keeps the fused op for every M (its rows are bitwise independent of the batch).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import native as native_kernels
from kernels import reference, tuning_cache

log = logging.getLogger("nibble.kernels")


DENSE_PROBE_M = (64, 128, 256, 512)

_INT4_KERNEL_GROUPS = (32, 64, 128, 256)
_INT4_N_MULTIPLE = 16
_INT8_BF16_K_MULTIPLE = 16
_ALIGN = 64


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _rows(x: Tensor, K: int, act_dtype: torch.dtype, fmt: str) -> Tensor:
    """x [..., K] -> contiguous [M, K]; a wrong dtype is the caller's bug, so say how to fix it."""
    if x.dtype != act_dtype:
        raise TypeError(
            f"{fmt} weights were prepared for {act_dtype} activations but x is {x.dtype}; "
            f"prepare with act_dtype={x.dtype} or cast x"
        )
    if x.shape[-1] != K:
        raise ValueError(f"{fmt} linear expects x[..., {K}], got {tuple(x.shape)}")
    return x.reshape(-1, K).contiguous()


def _finish(y: Tensor, lead: torch.Size, N: int, bias: Tensor | None) -> Tensor:
    """y [M, N_padded] -> [*lead, N] with bias added in place, keeping y's dtype."""
    if y.shape[1] != N:
        y = y[:, :N].contiguous()
    if bias is not None:
        y.add_(bias)
    return y.view(*lead, N)


class CpuLayout:
    """What a CPU prepare returns: the tensors a layer's kernel reads, plus sizes.

    `linear(x, bias)` computes x [..., K] -> [..., N]; `path(M)` names the path a call with M
    rows takes ("cpu-dense": 16-bit weights, or dequantize per call at this M; "cpu-native":
    nibble's kernels/csrc; "cpu-fused": PyTorch's fused op)."""

    fused_label = "cpu-fused"
    # the smallest M from which the dequantize-per-call path serves (measured at prepare), or
    # None: the fused path at every M
    dense_from: int | None = None

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def path(self, M: int) -> str:
        start = self.dense_from
        return "cpu-dense" if start is not None and start <= M else self.fused_label

    def tensors(self) -> list[Tensor]:
        """Every tensor the layout holds (its resident bytes)."""
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)]

    def fused_step(self) -> tuple[list[Tensor], int] | None:
        """What the fused decode step (kernels/csrc/llama_decode_cpu.cpp) takes for this layer:
        three tensors and a group size, in one of the forms its `Linear` reads; None where it
        cannot run this layer."""
        return None


@dataclass
class Dense(CpuLayout):
    """Fallback: dequantized weights [N, K] in the activation dtype, through F.linear."""

    weight: Tensor
    fmt: str

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        N, K = self.weight.shape
        y = F.linear(_rows(x, K, self.weight.dtype, self.fmt), self.weight)
        return _finish(y, x.shape[:-1], N, bias)

    def path(self, M: int) -> str:
        return "cpu-dense"


def _dense(w: Tensor, act_dtype: torch.dtype, fmt: str) -> Dense:
    """float32 [N, K] dequantized weights -> Dense in act_dtype."""
    return Dense(w.to(act_dtype).contiguous(), fmt)


def is_dense(prepared: CpuLayout) -> bool:
    """True when prepare fell back to dequantized 16-bit weights (nf4 always does)."""
    return isinstance(prepared, Dense | Fp16Gemm)


def linear(x: Tensor, prepared: CpuLayout, bias: Tensor | None = None) -> Tensor:
    """x [..., K] act_dtype -> [..., N] act_dtype, for every CPU layout."""
    return prepared.linear(x, bias)




_SCRATCH: dict[tuple, Tensor] = {}


def _scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A buffer reused by every call with this tag and shape: the dense path dequantizes a whole
    layer per call, and fresh multi-MB allocations would page-fault on every call. The engine
    runs one forward pass at a time, so layers never use a buffer concurrently."""
    key = (tag, shape, dtype)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = _SCRATCH[key] = torch.empty(shape, dtype=dtype)
    return buf


def _median_seconds(fn: Callable[[Tensor], Tensor], x: Tensor, reps: int = 3) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# What load-time timing decided in this process, by choice key (see _choice): the value and
# where it came from ("measured" now, or "cached" in the machine's file).
_MEASURED: dict[str, tuple[Any, str]] = {}


def _timing_off(batch_invariant: bool) -> bool:
    """Nothing is timed (and the batch-size-independent path kept) with batch_invariant or
    NIBBLE_TUNE=0."""
    return batch_invariant or os.environ.get("NIBBLE_TUNE") == "0"


def cache_path() -> Path:
    """This CPU's file of measured choices (kernels/tuning_cache.py): one per CPU model and
    instruction set PyTorch uses on it."""
    model = native_kernels.cpuinfo("model name") or platform.processor() or platform.machine()
    return tuning_cache.file_for(f"cpu-{model}-{torch.backends.cpu.get_cpu_capability()}")


def _key_text(key: tuple) -> str:
    return "/".join([f"torch{torch.__version__}", *(str(k).removeprefix("torch.") for k in key),
                     f"threads{torch.get_num_threads()}"])


def _choice(key: tuple, measure: Callable[[], Any], describe: Callable[[Any], str],
            valid: Callable[[Any], bool]) -> Any:
    """The choice for `key` (a layer shape and path family): decided earlier in this process,
    stored for this machine, or measured now and stored (NIBBLE_RETUNE=1: always measured).
    The stored key adds the PyTorch version and the thread count, which change timings;
    `measure()` returns a JSON value, and a stored value that fails `valid` is measured again."""
    text = _key_text(key)
    if text not in _MEASURED:
        path = cache_path()
        stored = {} if tuning_cache.retune() else tuning_cache.read(path)
        if text in stored and valid(stored[text]):
            _MEASURED[text] = stored[text], "cached"
        else:
            _MEASURED[text] = measure(), "measured"
            tuning_cache.store(path, text, _MEASURED[text][0])
        log.info("cpu dispatch %s: %s (%s)", text, describe(_MEASURED[text][0]),
                 _MEASURED[text][1] if _MEASURED[text][1] == "measured" else f"stored in {path}")
    return _MEASURED[text][0]


def choices() -> list[dict]:
    """What this process's load-time dispatch decided: one entry per layer shape and path
    family, with the value and whether it was measured now or read from the machine's file."""
    return [{"key": key, "value": value, "source": source}
            for key, (value, source) in sorted(_MEASURED.items())]


def _dense_from(key: tuple, fused: Callable[[Tensor], Tensor], dense: Callable[[Tensor], Tensor],
                K: int, act_dtype: torch.dtype, batch_invariant: bool) -> int | None:
    """The smallest probed M from which dense beats fused (at it and every larger probe), or
    None (also when timing is off)."""
    if _timing_off(batch_invariant):
        return None

    def measure() -> int | None:
        start = None
        for M in reversed(DENSE_PROBE_M):
            x = torch.randn(M, K).to(act_dtype)
            if _median_seconds(dense, x) >= _median_seconds(fused, x):
                break
            start = M
        return start

    return _choice(key, measure, lambda start: f"dequantize + fp32 GEMM from M {start}"
                   if start else "fused at every M", lambda v: v is None or v in DENSE_PROBE_M)


def fp16_gemm_prepare(weight: Tensor, batch_invariant: bool = False) -> Any | None:
    """16-bit dense weights [N, K]: fbgemm's fp16 GEMM (fp16 weights, fp32 math) packed, where
    on this CPU it beats F.linear by 1.25x at 16 rows and is not slower at 1 row (within the
    10% a 2-core machine's timings wander); else None. On CPUs without
    bf16 matmul units a bf16 F.linear is emulated (2-core AVX2 EPYC, 576x49152 lm_head: 3.5 ms
    at M = 1, 49 ms at M = 16, against 2.3 and 9.1 ms for fbgemm fp16). The packed copy is
    extra memory (the 16-bit weight stays: a tied lm_head shares it with the embedding).
    fbgemm's rows are not bitwise independent of the batch: never with batch_invariant."""
    if _timing_off(batch_invariant) or weight.device.type != "cpu" \
            or weight.dtype not in (torch.bfloat16, torch.float16):
        return None
    N, K = weight.shape
    packed = None

    def measure() -> dict:
        nonlocal packed
        packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), None)
        gains = []
        for M in (1, 16):
            x = torch.randn(M, K).to(weight.dtype)
            gains.append(round(_median_seconds(lambda x: F.linear(x, weight), x, reps=5)
                               / _median_seconds(lambda x: fp16_gemm(x, packed), x, reps=5), 3))
        return {"fbgemm": gains[0] >= 0.9 and gains[1] >= 1.25, "gains_m1_m16": gains}

    won = _choice(("fp16-gemm", K, N, weight.dtype), measure,
                  lambda v: f"{'fbgemm fp16 GEMM' if v['fbgemm'] else 'F.linear'} "
                  f"({v['gains_m1_m16'][0]:.1f}x at 1 row, {v['gains_m1_m16'][1]:.1f}x at 16)",
                  lambda v: isinstance(v, dict) and isinstance(v.get("fbgemm"), bool)
                  and isinstance(v.get("gains_m1_m16"), list) and len(v["gains_m1_m16"]) == 2)
    if not won["fbgemm"]:
        return None
    return packed if packed is not None else \
        torch.ops.quantized.linear_prepack_fp16(weight.float(), None)


def fp16_gemm(x: Tensor, packed: Any, bias: Tensor | None = None) -> Tensor:
    """x [..., K] -> [..., N] in x's dtype, through fbgemm's fp16 GEMM."""
    y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]).float(), packed)
    y = y.to(x.dtype)
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], y.shape[-1])


@dataclass
class Fp16Gemm(CpuLayout):
    """16-bit weights held only as fbgemm's packed fp16 copy (fp16_gemm_prepare)."""

    packed: Any
    N: int
    K: int
    fmt: str

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if x.shape[-1] != self.K:
            raise ValueError(f"{self.fmt} linear expects x[..., {self.K}], got {tuple(x.shape)}")
        return fp16_gemm(x, self.packed, bias)

    def path(self, M: int) -> str:
        return "cpu-dense"


def _dense_rows(x2: Tensor, w_t: Tensor, N: int) -> Tensor:
    """x2 [M, K] @ fp32 W^T [K, >=N] -> [M, N] in x2's dtype."""
    y = torch.mm(x2.float(), w_t)
    return (y if y.shape[1] == N else y[:, :N]).to(x2.dtype)


# ---------------------------------------------------------------------------------------------
# int4: aten._weight_int4pack_mm_for_cpu
# ---------------------------------------------------------------------------------------------


def _int4_kernel_group(K: int, group_size: int) -> int | None:
    """The op's group size serving groups of `group_size` over K, or None if there is none."""
    kg = math.gcd(K, group_size)
    return kg if kg in _INT4_KERNEL_GROUPS else None


def _int4_scales_and_zeros(
    scales: Tensor, zeros: Tensor, group_size: int, K: int, kg: int, act_dtype: torch.dtype
) -> Tensor:
    """scales, zeros [N, G] -> [K/kg, N, 2] act_dtype, one row per kernel group."""
    # Kernel group j starts at k = j*kg, which lies in stored group (j*kg) // group_size.
    src = torch.arange(0, K, kg, device=scales.device) // group_size
    sz = torch.stack([scales[:, src].T, zeros[:, src].T], dim=-1)
    return sz.to(act_dtype).contiguous()


def _int4_path(K: int, group_size: int, native: bool | None = None) -> tuple[str, int]:
    """How int4_prepare serves weights of K inputs in groups of group_size: ("dense" | "native"
    | "op", kernel group). native None: nibble's kernel wherever it runs; False: never."""
    kg = _int4_kernel_group(K, group_size)
    if kg is None:
        return "dense", 0
    if native is not False and native_kernels.supported() is None \
            and native_kernels.load() is not None and K % 8 == 0 and kg % 8 == 0:
        return "native", kg
    return "op", kg


def int4_prepare(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    K: int,
    act_dtype: torch.dtype = torch.bfloat16,
    batch_invariant: bool = False,
    native: bool | None = None,
) -> Dense | Int4Op | Int4Native:
    """Repack int4 weights for nibble's AVX2 kernel where it runs (native None: wherever
    kernels.native loads; False: never), else for PyTorch's fused CPU op (or dequantize, see
    the module docstring).

    qweight uint8 [N, ceil(K/2)], scales/zeros float32 [N, ceil(K/group_size)] -> Int4Native
    (the native kernel's layout), Int4Op (PyTorch's op), or Dense.
    """
    path, kg = _int4_path(K, group_size, native)
    if path == "dense":
        w = reference.dequantize_int4(qweight, scales, zeros, group_size, K)
        return _dense(w, act_dtype, "int4")
    N = qweight.shape[0]
    q = reference.unpack_nibbles(qweight, K).to(torch.int32)
    if path == "native":
        return _int4_native_prepare(q, scales, zeros, group_size, K, kg, act_dtype,
                                    batch_invariant)
    sz = _int4_scales_and_zeros(scales.float(), zeros.float(), group_size, K, kg, act_dtype)
    pad = -N % _INT4_N_MULTIPLE
    if pad:
        # Padded rows have scale 0 and zero 0, so they compute 0 and are sliced off.
        q = torch.cat([q, q.new_full((pad, K), 8)])
        sz = torch.cat([sz, sz.new_zeros(sz.shape[0], pad, 2)], dim=1)
    packed = _int4_pack(q)
    prepared = Int4Op(packed, sz, kg, N)
    layout = int4_pack_layout()
    # The guard: the dense path reads the codes back out of the packed bytes, so it is only
    # offered where this very weight decodes to its codes (a PyTorch whose packer changed
    # keeps the fused op alone, and stays correct).
    if layout is not None and torch.equal(_int4_codes_t(packed, layout), q.T):
        prepared.pack = layout
        prepared.dense_from = _dense_from(
            ("int4", K, N, kg, act_dtype), prepared.fused,
            lambda x: _dense_rows(x, prepared.dense_t(), N), K, act_dtype, batch_invariant)
    return prepared


def _int4_native_prepare(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int, K: int,
                         kg: int, act_dtype: torch.dtype, batch_invariant: bool) -> Int4Native:
    """codes int32 [N, K] -> the native kernel's layout, with W = q * scale + bias per kernel
    group (bias = zero - 8 * scale: the same weights as PyTorch's (q - 8) * scale + zero, with
    the stored fp32 scales)."""
    N = q.shape[0]
    pad = -N % 8
    src = torch.arange(0, K, kg) // group_size  # the stored group of each kernel group
    scale, zero = scales.float()[:, src], zeros.float()[:, src]
    if pad:  # padded columns: codes 0, scale 0, bias 0 -> they compute 0 and are sliced off
        q = torch.cat([q, q.new_zeros(pad, K)])
        scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
    Np = N + pad
    # word (b, c) lane j: the codes of column 8b + j at k = 8c .. 8c + 7, code i at bits 4i..
    c = q.to(torch.uint8).view(Np // 8, 8, K // 8, 8).permute(0, 2, 1, 3)
    words = (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous().view(torch.int32)
    prepared = Int4Native(words.view(Np // 8, K // 8, 8), scale.T.contiguous(),
                          (zero - 8 * scale).T.contiguous(), kg, N, act_dtype)
    prepared.dense_from = _dense_from(
        ("int4-native", native_kernels.source_digest(), K, N, kg, act_dtype), prepared.fused,
        lambda x: _dense_rows(x, prepared.dense_t(), N), K, act_dtype, batch_invariant)
    return prepared


@dataclass
class _Int4Layout(CpuLayout):
    """What both int4 layouts share: per call, the fused kernel below the measured crossover,
    else dequantize into fp32 scratch and one fp32 GEMM."""

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x2 = _rows(x, self.K, self.act_dtype, "int4")
        if self.path(x2.shape[0]) == "cpu-dense":
            return _finish(_dense_rows(x2, self.dense_t(), self.N), x.shape[:-1], self.N, bias)
        return _finish(self.fused(x2), x.shape[:-1], self.N, bias)


@dataclass
class Int4Native(_Int4Layout):
    """nibble's AVX2 int4 kernel (kernels/csrc/int4_cpu.cpp describes the layout): `native`
    int32 [Np/8, K/8, 8] with Np = N rounded up to 8, W = q * scale + bias per kernel group
    (`scale`, `bias` float32 [K/kg, Np])."""

    native: Tensor
    scale: Tensor
    bias: Tensor
    group_size: int  # the kernel group kg
    N: int
    act_dtype: torch.dtype
    dense_from: int | None = None
    fused_label = "cpu-native"

    @property
    def K(self) -> int:
        return self.native.shape[1] * 8

    def fused(self, x2: Tensor) -> Tensor:
        return native_kernels.load().int4_linear(x2, self.native, self.scale, self.bias,
                                                 self.group_size, self.N, False)

    def fused_step(self) -> tuple[list[Tensor], int]:
        return [self.native, self.scale, self.bias], self.group_size

    def dense_t(self) -> Tensor:
        """fp32 W^T [K, Np] from the native layout, into a shared scratch buffer."""
        words = self.native
        out = _scratch("int4-dense", (words.shape[1] * 8, words.shape[0] * 8), torch.float32)
        native_kernels.load().int4_dequantize_t(words, self.scale, self.bias, self.group_size,
                                                out)
        return out


@dataclass
class Int4Op(_Int4Layout):
    """PyTorch's fused op: `packed` uint8 [Np, K/2] with Np = N rounded up to 16,
    `scales_and_zeros` [K/kg, Np, 2] in the activation dtype. `pack` is the packer's layout
    (Int4PackLayout), or None where this weight does not decode, and then the fused op serves
    every M."""

    packed: Tensor
    scales_and_zeros: Tensor
    group_size: int  # the kernel group kg
    N: int
    dense_from: int | None = None
    pack: Int4PackLayout | None = None

    @property
    def K(self) -> int:
        return self.packed.shape[1] * 2

    @property
    def act_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def fused(self, x2: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_and_zeros)

    def dense_t(self) -> Tensor:
        """fp32 W^T [K, Np] dequantized from the packed codes into a shared scratch buffer."""
        if self.pack is None:
            raise RuntimeError("this int4 weight has no dense path: its pack layout is unknown")
        packed, sz, kg = self.packed, self.scales_and_zeros, self.group_size
        Np, K = packed.shape[0], packed.shape[1] * 2
        w = _int4_codes_into(packed, self.pack, _scratch("int4-dense", (K, Np), torch.float32))
        w3 = w.view(K // kg, kg, Np)  # W = (q - 8) * scale + zero, per kernel group
        w3.sub_(8).mul_(sz[:, None, :, 0]).add_(sz[:, None, :, 1])
        return w


def _int4_pack(q: Tensor) -> Tensor:
    """codes int32 [Np, K] -> the op's packed uint8 [Np, K/2]. innerKTiles (2) only matters
    for the CUDA layout; the CPU packer ignores it."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)


@dataclass(frozen=True)
class Int4PackLayout:
    """Where `_convert_weight_to_int4pack_for_cpu` puts each code. It depends on the CPU
    capability ATen dispatches to (torch.backends.cpu.get_cpu_capability(), which
    ATEN_CPU_CAPABILITY can lower), so it is read off the packer once per process.

    The packed [Np, K/2] bytes are blocks of `block` weight rows, one after another; a block
    is K byte-rows of block/2 bytes each, byte-row k holding code k of the block's rows. In a
    full block, byte j of a byte-row holds
    - halves: weight row j's code in its low nibble and row j + block/2's in its high nibble;
    - pairs: weight rows 2j (low) and 2j + 1 (high).
    The last block, when N % block rows are left for it, is pairs over those rows.
    torch 2.13 on x86 (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel):
    AVX512 is halves of 64, AVX2 halves of 32, DEFAULT (no vector ISA, and MSVC builds) pairs
    of 32.
    """

    block: int
    halves: bool


# The layouts torch writes on x86 (AVX512, AVX2, DEFAULT); a packer that writes none of them
# leaves the dense path off.
_INT4_LAYOUT_CANDIDATES = (Int4PackLayout(64, True), Int4PackLayout(32, True),
                           Int4PackLayout(32, False))


@functools.cache
def int4_pack_layout() -> Int4PackLayout | None:
    """The layout this process's packer writes, told by packing random codes whose rows fill
    two blocks of the widest candidate and a 16-row tail, or None when no candidate decodes
    them (the dense path is then off and the fused op serves every M)."""
    N, K = 2 * max(c.block for c in _INT4_LAYOUT_CANDIDATES) + _INT4_N_MULTIPLE, 64
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(0),
                      dtype=torch.int32)
    packed = _int4_pack(q)
    for layout in _INT4_LAYOUT_CANDIDATES:
        if torch.equal(_int4_codes_t(packed, layout), q.T):
            log.info("cpu int4 pack layout (%s): %s of %d rows",
                     torch.backends.cpu.get_cpu_capability(),
                     "halves" if layout.halves else "pairs", layout.block)
            return layout
    log.warning("cpu int4: the packer's layout (%s) is none this version knows; int4 layers "
                "run the fused op at every batch size", torch.backends.cpu.get_cpu_capability())
    return None


def _unpack_rows(b: Tensor, halves: bool, out: Tensor) -> None:
    """b uint8 [..., R/2] (one byte row of a block) -> out uint8 [..., R]: row r's code at r."""
    half = b.shape[-1]
    o = out.view(*b.shape[:-1], 2, half) if halves else out.view(*b.shape, 2)
    torch.bitwise_and(b, 15, out=o[..., 0, :] if halves else o[..., 0])
    torch.bitwise_right_shift(b, 4, out=o[..., 1, :] if halves else o[..., 1])


def _int4_unpack(packed: Tensor, layout: Int4PackLayout,
                 scratch: bool = True) -> tuple[Tensor, Tensor | None]:
    """The codes, uint8 [Np // block, K, block] for the full blocks (rows in order within each
    block, k-major) and uint8 [K, tail] for the last rows, or None: in buffers shared per shape
    (scratch: the dense path, every call) or fresh ones (a one-off decode, nothing kept)."""
    Np, K = packed.shape[0], packed.shape[1] * 2
    B = layout.block
    nb, tail = divmod(Np, B)
    flat = packed.view(-1)

    def buffer(tag: str, shape: tuple[int, ...]) -> Tensor:
        return _scratch(tag, shape, torch.uint8) if scratch else torch.empty(shape, dtype=torch.uint8)

    body = buffer("int4-codes", (nb, K, B))
    _unpack_rows(flat[: nb * K * B // 2].view(nb, K, B // 2), layout.halves, body)
    if not tail:
        return body, None
    rest = buffer("int4-codes-tail", (K, tail))
    _unpack_rows(flat[nb * K * B // 2:].view(K, tail // 2), False, rest)
    return body, rest


def _int4_codes_into(packed: Tensor, layout: Int4PackLayout, out: Tensor,
                     scratch: bool = True) -> Tensor:
    """Writes the codes as [K, Np] (W^T's layout) into out, in out's dtype."""
    body, rest = _int4_unpack(packed, layout, scratch)
    nb, K, B = body.shape
    out[:, : nb * B].view(K, nb, B).copy_(body.permute(1, 0, 2))
    if rest is not None:
        out[:, nb * B:].copy_(rest)
    return out


def _int4_codes_t(packed: Tensor, layout: Int4PackLayout) -> Tensor:
    """The codes as int32 [K, Np], decoded from the packed bytes into fresh memory (prepare's
    check: no per-shape buffer stays behind for a layer that never takes the dense path)."""
    Np, K = packed.shape[0], packed.shape[1] * 2
    return _int4_codes_into(packed, layout, torch.empty(K, Np, dtype=torch.int32), scratch=False)


# ---------------------------------------------------------------------------------------------
# int8: aten._weight_int8pack_mm
# ---------------------------------------------------------------------------------------------


def int8_prepare(
    qweight: Tensor, scales: Tensor, act_dtype: torch.dtype = torch.bfloat16,
    batch_invariant: bool = False,
) -> Int8Op | Dense:
    """qweight int8 [N, K], scales float32 [N] -> Int8Op, or Dense where the op cannot serve
    the shape (bf16, K % 16 != 0)."""
    K = qweight.shape[1]
    if act_dtype == torch.bfloat16 and K % _INT8_BF16_K_MULTIPLE:
        return _dense(reference.dequantize_int8(qweight, scales), act_dtype, "int8")
    if not qweight.is_contiguous() or qweight.data_ptr() % _ALIGN:
        # The op segfaults for M > 1 on a weight that is not 64-byte aligned (tensors read
        # from safetensors files sit at 8-byte offsets); a fresh allocation is aligned.
        qweight = qweight.contiguous().clone()
    prepared = Int8Op(qweight, scales.to(act_dtype).contiguous(), scales.float().contiguous())
    N, K = qweight.shape
    prepared.dense_from = _dense_from(
        ("int8", K, N, act_dtype), prepared.fused,
        lambda x: _dense_rows(x, prepared.dense_t(), N), K, act_dtype, batch_invariant)
    return prepared


@dataclass
class Int8Op(CpuLayout):
    """PyTorch's int8 weight-only op: `qweight` int8 [N, K] (64-byte aligned), `scales` [N] in
    the activation dtype, and `scales_f32`, the exact scales, for nibble's int8 kernel
    (kernels/csrc/int8_cpu.cpp)."""

    qweight: Tensor
    scales: Tensor
    scales_f32: Tensor
    dense_from: int | None = None

    def fused(self, x2: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)

    def dense_t(self) -> Tensor:
        """fp32 W^T [K, N] dequantized into a shared scratch buffer."""
        N, K = self.qweight.shape
        w = _scratch("int8-dense", (N, K), torch.float32)
        torch.mul(self.qweight, self.scales.float()[:, None], out=w)
        return w.T

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        N, K = self.qweight.shape
        x2 = _rows(x, K, self.scales.dtype, "int8")
        if self.path(x2.shape[0]) == "cpu-dense":
            return _finish(_dense_rows(x2, self.dense_t(), N), x.shape[:-1], N, bias)
        return _finish(self.fused(x2), x.shape[:-1], N, bias)


# ---------------------------------------------------------------------------------------------
# int8g (group-wise int8): no fused op; dequantize per call into fp32 scratch, one fp32 GEMM
# ---------------------------------------------------------------------------------------------


def int8g_prepare(
    qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, K: int,
    act_dtype: torch.dtype = torch.bfloat16, batch_invariant: bool = False,
) -> Int8Group:
    """qweight uint8 [N, K], scales/zeros float32 [N, G] -> Int8Group.

    PyTorch has no group-wise int8 op, so each call dequantizes the layer into a float32
    scratch buffer shared by every layer of its shape (W = q * scale + offset, one multiply and
    one add per weight) and runs one float32 GEMM: the 8-bit codes stay the only resident copy,
    and the values the GEMM sees are exact in float32 (benchmarks/gguf.py times it against
    the other formats). act_dtype and batch_invariant are accepted for the common signature:
    float32 math serves every activation dtype, and one path serves every batch size.
    """
    del act_dtype, batch_invariant
    N = qweight.shape[0]
    G = scales.shape[1]
    pad = G * group_size - K
    codes = qweight if not pad else torch.cat([qweight, qweight.new_full((N, pad), 128)], 1)
    scales = scales.float()
    offsets = zeros.float() - 128.0 * scales
    return Int8Group(codes.contiguous(), scales[..., None].contiguous(),
                     offsets[..., None].contiguous(), N, K)


@dataclass
class Int8Group(CpuLayout):
    """`codes` uint8 [N, G*g] (a ragged last group padded), `scales` and `offsets` float32
    [N, G, 1] with offsets = zeros - 128 * scales."""

    codes: Tensor
    scales: Tensor
    offsets: Tensor
    N: int
    K: int

    def path(self, M: int) -> str:
        return "cpu-dense"

    def dense(self) -> Tensor:
        """fp32 W [N, K] dequantized into a shared scratch buffer."""
        N, G = self.scales.shape[:2]
        w = _scratch("int8g-dense", tuple(self.codes.shape), torch.float32)
        w3 = w.view(N, G, -1)
        torch.mul(self.codes.view(N, G, -1), self.scales, out=w3)
        w3.add_(self.offsets)
        return w[:, : self.K]

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        if x.shape[-1] != self.K:
            raise ValueError(f"int8g linear expects x[..., {self.K}], got {tuple(x.shape)}")
        y = torch.mm(x.reshape(-1, self.K).float(), self.dense().T).to(x.dtype)
        return _finish(y, x.shape[:-1], self.N, bias)


# ---------------------------------------------------------------------------------------------
# nf4: no fused op; dequantize once (measurements in the module docstring)
# ---------------------------------------------------------------------------------------------


def nf4_prepare(
    qweight: Tensor,
    absmax: Tensor,
    group_size: int,
    K: int,
    act_dtype: torch.dtype = torch.bfloat16,
    batch_invariant: bool = False,
) -> Dense | Fp16Gemm:
    """qweight uint8 [N, ceil(K/2)], absmax float32 [N, G] -> Dense ([N, K] act_dtype), or
    Fp16Gemm in its place where fbgemm's fp16 GEMM measures faster (see fp16_gemm_prepare; the
    same 16 bits per weight).

    Dequantized in float32 and rounded once, so weights differ from the reference by at most
    half an ulp of act_dtype (fp16's where the fp16 GEMM serves).
    """
    prepared = _dense(reference.dequantize_nf4(qweight, absmax, group_size, K), act_dtype, "nf4")
    packed = fp16_gemm_prepare(prepared.weight, batch_invariant)
    if packed is not None:
        return Fp16Gemm(packed, prepared.weight.shape[0], K, "nf4")
    return prepared


# ---------------------------------------------------------------------------------------------
# Memory: what each prepare above keeps, from shapes alone (engine/plan.py's estimate; the
# tests check every format against the bytes of real prepared layouts)
# ---------------------------------------------------------------------------------------------


def stored_choice(key: tuple) -> tuple[bool, Any]:
    """(known, value) of a load-time choice without measuring it: what this process decided or
    this machine stored (see _choice); unknown where a load would measure it now."""
    text = _key_text(key)
    if text in _MEASURED:
        return True, _MEASURED[text][0]
    stored = {} if tuning_cache.retune() else tuning_cache.read(cache_path())
    return (True, stored[text]) if text in stored else (False, None)


def fp16_gemm_expected(N: int, K: int, dtype: torch.dtype) -> bool:
    """Whether fp16_gemm_prepare packs its copy of a 16-bit [N, K] weight: the stored choice,
    or, where a load would measure it, True (an estimate that must not fall short)."""
    if _timing_off(False) or dtype not in (torch.bfloat16, torch.float16):
        return False
    known, value = stored_choice(("fp16-gemm", K, N, dtype))
    return bool(value["fbgemm"]) if known and isinstance(value, dict) else True


# fbgemm's PackedGemmMatrixFP16 holds K in whole blocks of 512 rows and N in whole blocks of
# its kernel's width (16 columns with AVX2, 32 with AVX-512); measured on torch 2.13: a
# 49152 x 576 weight packs into 96 MiB, as 49152 x 1024 fp16 values.
_FBGEMM_ROW_BLOCK = 512


def fp16_gemm_bytes(N: int, K: int) -> int:
    """Bytes of fbgemm's packed fp16 copy of a [N, K] weight."""
    cols = 32 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 16
    return -(-K // _FBGEMM_ROW_BLOCK) * _FBGEMM_ROW_BLOCK * -(-N // cols) * cols * 2


def int4_bytes(N: int, K: int, group_size: int | None, act_dtype: torch.dtype) -> int:
    """Bytes of the layout int4_prepare keeps for a [N, K] weight."""
    path, kg = _int4_path(K, group_size)
    act = act_dtype.itemsize
    if path == "dense":
        return N * K * act
    if path == "native":
        Np = N + -N % 8
        return Np * K // 2 + 2 * (K // kg) * Np * 4
    Np = N + -N % _INT4_N_MULTIPLE
    return Np * K // 2 + (K // kg) * Np * 2 * act


def int8_bytes(N: int, K: int, group_size: int | None, act_dtype: torch.dtype) -> int:
    if act_dtype == torch.bfloat16 and K % _INT8_BF16_K_MULTIPLE:
        return N * K * act_dtype.itemsize
    return N * K + N * act_dtype.itemsize + N * 4


def int8g_bytes(N: int, K: int, group_size: int | None, act_dtype: torch.dtype) -> int:
    G = -(-K // group_size)
    return N * G * group_size + 2 * N * G * 4


def nf4_bytes(N: int, K: int, group_size: int | None, act_dtype: torch.dtype) -> int:
    """F.linear's dequantized copy, or fbgemm's."""
    return fp16_gemm_bytes(N, K) if fp16_gemm_expected(N, K, act_dtype) \
        else N * K * act_dtype.itemsize


def _dense_expected(key: tuple) -> bool:
    """Whether a layer may take the dequantize-per-call path: its stored crossover, or, where a
    load would measure it, True."""
    if _timing_off(False):
        return False
    known, value = stored_choice(key)
    return value is not None if known else True


def no_scratch(N: int, K: int, group_size: int | None, act_dtype: torch.dtype) -> dict[tuple, int]:
    return {}


def int8g_scratch(N: int, K: int, group_size: int | None,
                  act_dtype: torch.dtype) -> dict[tuple, int]:
    """The shared per-shape buffers (see _scratch) that a layer's dense path allocates at its
    first call with many rows: {(tag, shape): bytes}; layers of one shape share them. The same
    signature for every format."""
    G = -(-K // group_size)
    return {("int8g-dense", N, G * group_size): 4 * N * G * group_size}


def int8_scratch(N: int, K: int, group_size: int | None,
                 act_dtype: torch.dtype) -> dict[tuple, int]:
    if act_dtype == torch.bfloat16 and K % _INT8_BF16_K_MULTIPLE \
            or not _dense_expected(("int8", K, N, act_dtype)):
        return {}
    return {("int8-dense", N, K): 4 * N * K}


def int4_scratch(N: int, K: int, group_size: int | None,
                 act_dtype: torch.dtype) -> dict[tuple, int]:
    path, kg = _int4_path(K, group_size)
    if path == "native":
        Np = N + -N % 8
        key = ("int4-native", native_kernels.source_digest(), K, N, kg, act_dtype)
        return {("int4-dense", K, Np): 4 * K * Np} if _dense_expected(key) else {}
    layout = int4_pack_layout() if path == "op" else None
    if layout is None or not _dense_expected(("int4", K, N, kg, act_dtype)):
        return {}
    Np = N + -N % _INT4_N_MULTIPLE
    nb, tail = divmod(Np, layout.block)
    out = {("int4-dense", K, Np): 4 * K * Np, ("int4-codes", nb, K, layout.block): nb * K * layout.block}
    if tail:
        out[("int4-codes-tail", K, tail)] = K * tail
    return out
