"""Quantized test weights, the reference output, and the rounding bound kernels are held to.

Tolerance (derived, not tuned).  With u the unit roundoff of the activation dtype
(2**-8 bf16, 2**-11 fp16, 2**-24 fp32) and x exactly representable in it:
- each dequantized weight passes through at most `roundings` roundings to the activation
  dtype (CPU ops: scale and zero, or the dequantized value: 2; Triton: scale, offset and the
  dequantized tile before a tensor-core dot: 3), so |dW| <= roundings * u * A with
  A = |q-8|*s + |z| for int4 and |W| for int8 and nf4;
- both sides accumulate K products in fp32 in different orders: <= K * 2**-24 * |x| @ A.T each;
- the output (and the bias added to it) is rounded to the activation dtype: <= 2u * (|y| + |b|).
A wrong group, nibble or scale gives errors of the order of |y| itself, far above this bound.
"""

from __future__ import annotations

import torch

from kernels import dispatch
from kernels import reference as R


def weights(N: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * (torch.rand(N, 1, generator=g) * 0.1 + 0.01)


def quantize(fmt: str, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    if fmt == "int8":
        qweight, scales = R.quantize_int8(w)
        return {"qweight": qweight, "scales": scales}
    if fmt in ("int4", "int8g"):
        quantizer = R.quantize_int4 if fmt == "int4" else R.quantize_int8g
        qweight, scales, zeros = quantizer(w, group_size)
        return {"qweight": qweight, "scales": scales, "zeros": zeros}
    qweight, absmax = R.quantize_nf4(w, group_size)
    return {"qweight": qweight, "absmax": absmax}


def magnitude(fmt: str, t: dict[str, torch.Tensor], K: int, g: int,
              offsets: bool = False) -> torch.Tensor:
    """A [N, K]: what the weight rounding error scales with (see the module docstring).
    offsets: int4 (int8g) computed as q * s + (z - 8s) (z - 128s), as the Triton kernels do."""
    if fmt in ("int4", "int8g"):
        unpacked = fmt == "int8g"
        q = (t["qweight"] if unpacked else R.unpack_nibbles(t["qweight"], K)).float()
        s, z = R.expand_groups(t["scales"], K, g), R.expand_groups(t["zeros"], K, g)
        mid = 128 if unpacked else 8
        if offsets:
            return q * s + (z - mid * s).abs()
        return (q - mid).abs() * s + z.abs()
    if fmt == "int8":
        return R.dequantize_int8(t["qweight"], t["scales"]).abs()
    return R.dequantize_nf4(t["qweight"], t["absmax"], g, K).abs()


def reference(fmt: str, x, t, g, bias=None) -> torch.Tensor:
    prepare, linear = dispatch.get_kernels(fmt, "reference")
    return linear(x, prepare(t, K=x.shape[-1], group_size=g, act_dtype=x.dtype), bias)


def assert_within_bound(y, y_ref, x, A, bias=None, roundings: int = 2):
    u = torch.finfo(x.dtype).eps / 2
    K = x.shape[-1]
    xa = x.float().abs().reshape(-1, K) @ A.T
    b = bias.float().abs() if bias is not None else 0.0
    y_ref = y_ref.float().reshape(xa.shape)
    tol = (roundings * u + 2 * K * 2.0**-24) * xa + 2 * u * (y_ref.abs() + b) + 1e-6
    err = (y.float().reshape(xa.shape) - y_ref).abs()
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"error exceeds the rounding bound by {worst:.2f}x"


def script_cpu_clock(monkeypatch, through: str, wins) -> tuple[list, list]:
    """Makes kernels.cpu's load-time timings scripted: a timed call that goes through
    cpu.<through> takes 1 s where wins(M) and 2 s elsewhere, any other call the opposite.
    Returns (every (M, went through) timed, calls through it since the last timing). Choices
    are stored in a fresh directory (not the machine's file), read back by later calls."""
    import tempfile

    from kernels import cpu

    monkeypatch.delenv("NIBBLE_TUNE", raising=False)
    monkeypatch.delenv("NIBBLE_RETUNE", raising=False)
    monkeypatch.setenv("NIBBLE_CACHE", tempfile.mkdtemp(prefix="nibble-tuning-"))
    monkeypatch.setattr(cpu, "_MEASURED", {})
    calls, timed = [], []
    real = getattr(cpu, through)
    monkeypatch.setattr(cpu, through, lambda *a: calls.append(1) or real(*a))

    def clock(fn, x, reps=3):
        calls.clear()
        fn(x)
        went = bool(calls)
        timed.append((x.shape[0], went))
        return 1.0 if went == wins(x.shape[0]) else 2.0

    monkeypatch.setattr(cpu, "_median_seconds", clock)
    return timed, calls
