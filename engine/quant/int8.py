"""INT8 weights, W8A16: per output channel, symmetric (``int8``: W = q * scale[n]), or
group-wise along K, asymmetric (``int8-g32``: W = (q - 128) * scale + zero per group, the
layout GGUF Q8_0 and 8-bit GPTQ checkpoints load into)."""

from __future__ import annotations

from torch import Tensor

from engine.quant.base import PackedMethod, register
from kernels import reference


@register("int8")
class Int8Method(PackedMethod):
    name = "int8"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"qweight": (self.out_features, self.in_features), "scales": (self.out_features,)}

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        qweight, scales = reference.quantize_int8(w)
        return {"qweight": qweight, "scales": scales}

    def dequantize(self) -> Tensor:
        s = self.require_stored()
        return reference.dequantize_int8(s["qweight"], s["scales"])


@register("int8g")
class Int8GroupMethod(PackedMethod):
    name = "int8g"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        n, k, g = self.out_features, self.in_features, self.num_groups()
        return {"qweight": (n, k), "scales": (n, g), "zeros": (n, g)}

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        q, scales, zeros = reference.quantize_int8g(w, self.spec.group_size)
        return {"qweight": q, "scales": scales, "zeros": zeros}

    def dequantize(self) -> Tensor:
        s = self.require_stored()
        return reference.dequantize_int8g(
            s["qweight"], s["scales"], s["zeros"], self.spec.group_size, self.in_features
        )
