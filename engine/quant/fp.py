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

    def prepare(self, device: torch.device) -> None:
        self.weight = self.stored["weight"].to(device)
        self.stored = {"weight": self.weight}

    def apply(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, self.weight, bias)

    def dequantize(self) -> Tensor:
        return self.require_stored()["weight"].float()
