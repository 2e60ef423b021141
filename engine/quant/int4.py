"""INT4 weights, W4A16: group-wise along K, asymmetric by default (``int4-sym`` symmetric).

W[n, k] = (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g]; two codes per byte, even k in
the low nibble. The last group may be shorter than g when g does not divide K.
"""

from __future__ import annotations

from torch import Tensor

from engine.quant.base import PackedMethod, register
from kernels import reference


@register("int4")
class Int4Method(PackedMethod):
    name = "int4"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        n, k, g = self.out_features, self.in_features, self.num_groups()
        return {"qweight": (n, (k + 1) // 2), "scales": (n, g), "zeros": (n, g)}

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        q, scales, zeros = reference.quantize_int4(w, self.spec.group_size, self.spec.symmetric)
        return {"qweight": q, "scales": scales, "zeros": zeros}

    def dequantize(self) -> Tensor:
        s = self.require_stored()
        return reference.dequantize_int4(
            s["qweight"], s["scales"], s["zeros"], self.spec.group_size, self.in_features
        )
