"""W8A8: int8 weights per output channel (symmetric, stored and rounded exactly as int8) and
int8 activations rounded right before each GEMM (kernels/w8a8.py). A checkpoint from `nibble
quantize --method smoothquant --act-scales static` also stores each layer's calibrated
input_scale."""

from __future__ import annotations

from engine.quant.base import register
from engine.quant.int8 import Int8Method


@register("w8a8")
class W8A8Method(Int8Method):
    name = "w8a8"

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().expected_shapes(), "input_scale": (1,)}
