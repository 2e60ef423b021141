"""NF4 weights: NormalFloat4 codes with a group-wise absmax scale (default group 64).

W[n, k] = NF4_CODEBOOK[q[n, k]] * absmax[n, k // g], the code book bitsandbytes uses.
"""

from __future__ import annotations

from torch import Tensor

from engine.quant.base import PackedMethod, register
from kernels import reference


@register("nf4")
class NF4Method(PackedMethod):
    name = "nf4"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        n, k = self.out_features, self.in_features
        return {"qweight": (n, (k + 1) // 2), "absmax": (n, self.num_groups())}

    def quantize(self, w: Tensor) -> dict[str, Tensor]:
        q, absmax = reference.quantize_nf4(w, self.spec.group_size)
        return {"qweight": q, "absmax": absmax}

    def dequantize(self) -> Tensor:
        s = self.require_stored()
        return reference.dequantize_nf4(
            s["qweight"], s["absmax"], self.spec.group_size, self.in_features
        )
