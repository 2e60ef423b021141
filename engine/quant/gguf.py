"""GGUF blocks as nibble's storage: Q4_0, Q4_1 and Q8_0 repacked losslessly, nothing re-rounded.

llama.cpp's block formats (ggml-common.h; the gguf package's `quants` module dequantizes them
the same way), blocks of 32 weights along a row, fp16 parameters:

- Q4_0 (18 bytes): d, then 16 bytes of codes; weight j is the low nibble of byte j for
  j < 16 and the high nibble of byte j - 16 otherwise.  W = d * (q - 8).
- Q4_1 (20 bytes): d, m, then the codes as in Q4_0.  W = d * q + m.
- Q8_0 (34 bytes): d, then 32 signed bytes.  W = d * q.

Into int4-g32 (W = (c - 8) * scale + zero) and int8-g32 (W = (c - 128) * scale + zero):

- Q4_0 -> int4: c = q, scale = d, zero = 0.
- Q4_1 -> int4: c = q, scale = d, zero = m + 8 d.
- Q8_0 -> int8g: c = q + 128, scale = d, zero = 0.
- Q4_0 / Q4_1 -> int8g (a fused module whose other shards are Q8_0): c = q + 120, same
  scale and zero.

Exactness in float32: (c - 8) * d is exact (an 11-bit d times a code of at most 8 bits), so
our dequantization rounds the exact value d * q + m once, as the gguf package does, provided
zero = m + 8 d itself is exact in float32. That holds unless m and 8 d lie more than 13 binary
orders apart; `convert` counts the blocks where it does not (0 of 3,317,760 in the default
model) so a caller can say so. The CPU's fused int4 op takes its scales in the activation
dtype, so with bf16 activations it computes with d and zero rounded to bf16 (the codes stay
exact); the reference kernels and int8g on CPU compute with the exact float32 values.

K-quants (Q2_K to Q6_K) and the other types are not repacked: see `native_spec`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from engine.config import QuantSpec
from kernels import reference

BLOCK = 32
INT4_G32 = QuantSpec("int4", BLOCK)
INT8_G32 = QuantSpec("int8", BLOCK)
# type name -> (bytes per block, the format it repacks into)
NATIVE = {"Q4_0": (18, INT4_G32), "Q4_1": (20, INT4_G32), "Q8_0": (34, INT8_G32)}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# Types read through the gguf package's exact dequantization and then quantized by our
# round-to-nearest: to int4-g32 up to about 4.5 bits per weight, int8-g32 above.
REQUANT_INT8 = ("Q5_0", "Q5_1", "Q5_K", "Q6_K")


def native_spec(type_names: list[str]) -> tuple[QuantSpec | None, bool]:
    """The format for a module whose shards (q|k|v, gate|up) are stored as `type_names`, and
    whether its blocks repack losslessly into it. (None, True): all float, the module keeps the
    model's float format.

    Q4_0/Q4_1 -> int4-g32, Q8_0 (or Q8_0 with Q4 shards) -> int8-g32, all repacked. Anything
    else (K-quants, Q5_0/Q5_1, the IQ types, or float shards beside quantized ones) is
    dequantized exactly and quantized by us to int4-g32, or int8-g32 when a shard has 5 or more
    bits. K-quants are not repacked because none fits our layouts exactly: Q5_K and Q6_K have
    no 5- or 6-bit format here, and Q4_K's per-32 zero 8 d sc - dmin m needs up to 26 bits, so
    it would not stay exact in float32 the way Q4_0/Q4_1's do.
    """
    if all(t in FLOAT_TYPES for t in type_names):
        return None, True
    if all(t in NATIVE for t in type_names):
        return (INT8_G32 if "Q8_0" in type_names else INT4_G32), True
    wide = any(t in REQUANT_INT8 or t in ("Q8_0", *FLOAT_TYPES) for t in type_names)
    return (INT8_G32 if wide else INT4_G32), False


def _codes_q4(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32] codes 0..15 (low nibbles first, then high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fp16(col: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(col).view(np.float16).astype(np.float32))


def convert(type_name: str, data: np.ndarray, rows: int, cols: int,
            spec: QuantSpec) -> tuple[dict[str, Tensor], int]:
    """One tensor's raw blocks (uint8 [rows, bytes per row]) -> (our stored tensors in `spec`,
    the number of blocks whose float32 zero is not exact; 0 means every value is the gguf
    package's dequantization exactly)."""
    size, _ = NATIVE[type_name]
    if cols % BLOCK:
        raise ValueError(f"a {type_name} row of {cols} weights is not a whole number of blocks")
    groups = cols // BLOCK
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows * groups, size)
    d = _fp16(blocks[:, 0:2])
    if type_name == "Q8_0":
        codes = blocks[:, 2:].view(np.int8).astype(np.int16) + 128
        zeros, inexact = torch.zeros_like(d), 0
    else:
        start = 4 if type_name == "Q4_1" else 2
        codes = _codes_q4(blocks[:, start:])
        if type_name == "Q4_1":
            m = _fp16(blocks[:, 2:4])
            zeros = m + 8.0 * d
            inexact = int((zeros.double() != m.double() + 8.0 * d.double()).sum())
        else:
            zeros, inexact = torch.zeros_like(d), 0
        if spec.format == "int8g":
            codes = codes.astype(np.int16) + 120  # the same (c - 128) as (q - 8)
    q = torch.from_numpy(codes.astype(np.uint8)).reshape(rows, cols)
    scales, zeros = d.reshape(rows, groups), zeros.reshape(rows, groups)
    if spec.format == "int8g":
        return {"qweight": q.contiguous(), "scales": scales, "zeros": zeros}, inexact
    return {"qweight": reference.pack_nibbles(q), "scales": scales, "zeros": zeros}, inexact
