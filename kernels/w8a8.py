"""W8A8: int8 weights (per output channel, symmetric) times int8 activations, rounded per
token right before each GEMM ("dynamic") or by one calibrated scale per layer ("static",
SmoothQuant's O3), summed exactly in int32 and scaled once. kernels/reference.py
(quantize_activations, w8a8_linear) defines it; `nibble quantize --method smoothquant`
(engine/quant/smoothquant.py) makes the activations worth rounding.

Stored: qweight int8 [N, K], scales float32 [N], optionally input_scale float32 [1].

CPU: two paths computing the same numbers.
- "cpu-native" (kernels/csrc/w8a8_cpu.cpp, AVX2): rounds each row to int8 and sums int8 x int8
  products in int32; the weight is held as int8 [N, Kp], K padded with zeros to 32.
- "cpu-dense": rounds the rows in PyTorch, widens the int8 codes into a shared float32 scratch
  buffer and runs one float32 GEMM. Its sums are the integers the native kernel computes
  wherever every partial sum stays below 2**24: always for K <= 1040 (|q| <= 127); past that
  (down_proj's K = 1536 in the default model) only sums that large round, which needs most
  products of a row near 127 * 127 with one sign, so the paths agree bit for bit in practice
  (the tests check K = 1536) rather than by construction. Past a crossover M the GEMM's reuse of each weight
  across rows wins; prepare measures it per shape, as the other CPU formats do
  (kernels/cpu.py), and it is the only path where the native kernels cannot run.
Triton (CUDA): kernels/triton/w8a8.py, an int8 tl.dot GEMM with the scales in the epilogue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import cpu, formats, reference
from kernels import native as native_kernels

_BLOCK = 32  # the native kernel's K step


def _padded(K: int) -> int:
    return K + -K % _BLOCK


def _static_scale(tensors: Mapping[str, Tensor]) -> Tensor | None:
    s = tensors.get("input_scale")
    return None if s is None else s.float().reshape(1).contiguous()


@dataclass
class W8A8Cpu(cpu.CpuLayout):
    qweight: Tensor  # int8 [N, Kp], zeros past K
    scales: Tensor  # float32 [N]
    input_scale: Tensor | None  # float32 [1]: static; None: per-row scales
    K: int
    act_dtype: torch.dtype
    native: bool  # the native kernel serves below dense_from
    dense_from: int | None = None
    fused_label = "cpu-native"

    def __post_init__(self) -> None:
        # the native kernel's argument: the static scale, or -1 for per-row scales
        self.static = -1.0 if self.input_scale is None else float(self.input_scale)

    def path(self, M: int) -> str:
        return super().path(M) if self.native else "cpu-dense"

    def fused_step(self) -> tuple[list[Tensor], int] | None:
        """The codes, scales and static scale (empty: per-row), where K needs no padding."""
        if not self.native or self.qweight.shape[1] != self.K:
            return None
        static = self.input_scale if self.input_scale is not None else torch.empty(0)
        return [self.qweight, self.scales, static], 0

    def fused(self, x2: Tensor) -> Tensor:
        """The kernel reads float32 rows: a bf16 x is widened once (M x K, small next to the
        GEMM)."""
        return native_kernels.load().w8a8_linear(x2.float(), self.qweight, self.scales,
                                                 self.static)

    def dense(self, x2: Tensor) -> Tensor:
        xq, sx = reference.quantize_activations(x2, self.input_scale, as_int8=False)
        N = self.qweight.shape[0]
        w = cpu._scratch("w8a8-dense", (N, self.K), torch.float32)
        w.copy_(self.qweight[:, : self.K])
        return torch.mm(xq, w.T).mul_(sx[:, None]).mul_(self.scales)

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        x2 = cpu._rows(x, self.K, self.act_dtype, "w8a8")
        y = self.fused(x2) if self.path(x2.shape[0]) == "cpu-native" else self.dense(x2)
        if bias is not None:
            y.add_(bias)
        return y.to(self.act_dtype).view(*x.shape[:-1], y.shape[1])


def cpu_prepare(tensors: Mapping[str, Tensor], *, K: int, group_size: int | None,
                act_dtype: torch.dtype, batch_invariant: bool = False) -> W8A8Cpu:
    q = tensors["qweight"]
    N = q.shape[0]
    padded = torch.zeros(N, _padded(K), dtype=torch.int8)
    padded[:, :K] = q
    native = native_kernels.load() is not None
    prepared = W8A8Cpu(padded, tensors["scales"].float().contiguous(), _static_scale(tensors),
                       K, act_dtype, native)
    if native:
        prepared.dense_from = cpu._dense_from(
            ("w8a8", native_kernels.source_digest(), K, N, act_dtype), prepared.fused,
            prepared.dense, K, act_dtype, batch_invariant)
    return prepared


def cpu_bytes(N: int, K: int, group_size: int | None, act_dtype: torch.dtype) -> int:
    """Dynamic scales (a static layer adds its 4-byte input scale)."""
    return N * _padded(K) + 4 * N


def cpu_scratch(N: int, K: int, group_size: int | None,
                act_dtype: torch.dtype) -> dict[tuple, int]:
    key = ("w8a8", native_kernels.source_digest(), K, N, act_dtype)
    if native_kernels.load() is not None and not cpu._dense_expected(key):
        return {}
    return {("w8a8-dense", N, K): 4 * N * K}


@dataclass
class W8A8Triton:
    w: dict[str, Tensor]
    K: int
    N: int

    def path(self, M: int) -> str:
        return "w8a8-gemm"


def _triton_prepare(tensors: Mapping[str, Tensor], *, K: int, group_size: int | None,
                    act_dtype: torch.dtype, batch_invariant: bool = False) -> W8A8Triton:
    """One launch config per batch size whatever batch_invariant says: a row's codes and sums
    never depend on the other rows."""
    from kernels.triton import w8a8

    return W8A8Triton(w8a8.repack(tensors, act_dtype), K, tensors["qweight"].shape[0])


def _triton_linear(x: Tensor, p: W8A8Triton, bias: Tensor | None = None) -> Tensor:
    from kernels.triton import w8a8

    return w8a8.linear(x, p.w, bias)


def _triton_bytes(N: int, K: int, group_size: int | None, act_dtype: torch.dtype) -> int:
    """Dynamic scales, as cpu_bytes."""
    from kernels.triton import w8a8

    return w8a8.layout_bytes(N, K, static=False)


W8A8 = formats.register(formats.Format(
    "w8a8", "w8a8", ("qweight", "scales"),
    backends={"reference": formats.reference_kernels(
                  reference.w8a8_linear, ("qweight", "scales", "input_scale"), grouped=False),
              "cpu": formats.Kernels(cpu_prepare, cpu.linear),
              "triton": formats.Kernels(_triton_prepare, _triton_linear)},
    cpu_bytes=cpu_bytes, triton_bytes=_triton_bytes, cpu_scratch=cpu_scratch,
    optional_tensors=("input_scale",), symmetric=True, examples=("w8a8",)))
