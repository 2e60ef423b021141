"""Quantization methods; importing this package fills the registry."""

from engine.quant import fp, int4, int8, nf4, w8a8  # noqa: F401  (registration side effects)
from engine.quant.base import QuantMethod, StoredMethod, make_method

__all__ = ["QuantMethod", "StoredMethod", "make_method"]
