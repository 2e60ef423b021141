"""INT8 weights, W8A16: per output channel, symmetric (W = q * scale[n])."""

from __future__ import annotations

from torch import Tensor

from engine.quant.base import PackedMethod, register
from kernels import reference


@register("int8")
class Int8Method(PackedMethod):
    name = "int8"
    tensor_names = ("qweight", "scales")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"qweight": (self.out_features, self.in_features), "scales": (self.out_features,)}

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        qweight, scales = reference.quantize_int8(w)
        return {"qweight": qweight, "scales": scales}

    def dequantize(self) -> Tensor:
        s = self.require_stored()
        return reference.dequantize_int8(s["qweight"], s["scales"])
