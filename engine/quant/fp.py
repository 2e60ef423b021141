"""No quantization: the weight stays in fp32, bf16 or fp16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import FLOAT_FORMATS
from engine.quant.base import StoredMethod, register


@register("fp32", "bf16", "fp16")
class FloatMethod(StoredMethod):
    tensor_names = ("weight",)

    @property
    def name(self) -> str:
        return self.spec.method

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.out_features, self.in_features)}

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        return {"weight": w.to(FLOAT_FORMATS[self.spec.method]).contiguous()}

    shared = False  # the weight is another module's storage too (a tied lm_head): keep it

    def prepare(self, device: torch.device, batch_invariant: bool = False) -> None:
        from kernels import cpu

        self.weight = self.stored["weight"].to(device)
        self.stored = {"weight": self.weight}
        # on CPUs where it measures faster: fbgemm's fp16 GEMM, which packs its own copy; the
        # 16-bit weight is then let go unless another module shares it
        self._fp16_gemm = cpu.fp16_gemm_prepare(self.weight, batch_invariant)
        self.extra_bytes = 0
        if self._fp16_gemm is not None:
            if self.shared:
                self.extra_bytes = cpu.fp16_gemm_bytes(*self.weight.shape)
            else:
                self.weight, self.stored = None, {}

    def apply(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self._fp16_gemm is not None:
            from kernels import cpu

            return cpu.fp16_gemm(x, self._fp16_gemm, bias)
        return F.linear(x, self.weight, bias)

    def kernel_path(self, M: int) -> str:
        """Which kernel serves a call (the same at every M): "fbgemm-fp16" or "F.linear"."""
        return "F.linear" if getattr(self, "_fp16_gemm", None) is None else "fbgemm-fp16"

    def dequantize(self) -> Tensor:
        return self.require_stored()["weight"].float()
