"""W8A8 Triton kernels against the reference (reference.quantize_activations, w8a8_linear).

On a machine without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py
sets it), on a GPU machine compiled on CUDA. Shapes cross tile edges: N = 100 is no multiple of
any BLOCK_N, K = 300 is two blocks of 128 and a ragged 44, M = 33 leaves a ragged row tile, and
K = 1100 makes the quantize kernel walk a row in two chunks.

Tolerances: the int32 sums are exact on both sides and the epilogue does the same fp32 ops in
the same order, so fp32 outputs agree to a few roundings (1e-6 of |acc * sx * s| + |bias|) and
16-bit ones to one ulp of the output dtype. The codes are compared bit for bit. One code off,
a wrong scale or a masked-out column gives errors far above these bounds.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels import reference as R  # noqa: E402
from kernels.triton import qgemm, w8a8  # noqa: E402
from tests.kernels.cases import weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not qgemm.interpreting() else "cpu"
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
N, K = 100, 300
MS = (1, 5, 33)


def _stored(n: int, k: int, seed: int, input_scale: float | None = None) -> dict:
    qweight, scales = R.quantize_int8(weights(n, k, seed))
    t = {"qweight": qweight, "scales": scales}
    if input_scale is not None:
        t["input_scale"] = torch.tensor([input_scale])
    return t


def _activations(M: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of different magnitudes, an outlier column, and row 1 all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, k, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[:, 7] *= 20
    if M > 1:
        x[1] = 0
    return x.to(dtype)


def _quantize(x, input_scale=None):
    s = None if input_scale is None else input_scale.to(DEVICE)
    q, sx = w8a8.quantize_activations(x.to(DEVICE), s)
    return q.cpu(), sx.cpu()


def _linear(x, t, bias=None, blocks=None):
    w = w8a8.repack({k: v.to(DEVICE) for k, v in t.items()}, x.dtype)
    b = None if bias is None else bias.to(DEVICE)
    if blocks is None:
        return w8a8.linear(x.to(DEVICE), w, b).cpu()
    xq, sx = w8a8.quantize_activations(x.to(DEVICE), w.get("input_scale"))
    return w8a8.gemm(xq, sx, w, b, x.dtype, blocks).cpu()


def _assert_matches_reference(y, x, t, bias=None):
    ref = R.w8a8_linear(x, t["qweight"], t["scales"], t.get("input_scale"), bias)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs()
    if y.dtype == torch.float32:
        # |acc * sx * s| + |bias|: the size the epilogue's roundings scale with
        mag = R.w8a8_linear(x, t["qweight"], t["scales"], t.get("input_scale")).abs()
        if bias is not None:
            mag = mag + bias.float().abs()
        bound = 1e-6 * mag
    else:
        mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[y.dtype]
        _, e = torch.frexp(ref.float())  # ref = m * 2**e, 0.5 <= |m| < 1
        bound = torch.where(ref == 0, 0.0, torch.ldexp(torch.ones_like(err),
                                                       e - 1 - mantissa_bits))
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error beyond the bound by {worst}"


# --- activation quantization ---------------------------------------------------------------


def _tie_row(k: int, top: float, step: float) -> torch.Tensor:
    """A row whose values divided by `step` are half-integers (rounding ties), plus `top`."""
    row = (torch.arange(k) % 40 - 20 + 0.5) * step
    row[0] = top
    return row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dynamic_codes_and_scales_are_the_reference_bitwise(dtype):
    x = _activations(48, 1100, 1, dtype)
    x[2, 1050] = 300.0  # the row's absmax in the second 1024-wide chunk
    x[3] = _tie_row(1100, 127.0, 1.0).to(dtype)  # scale exactly 1: x * 1 are the ties
    q, s = _quantize(x)
    rq, rs = R.quantize_activations(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s, rs) and torch.equal(q, rq)
    assert s[1] == 0 and not q[1].any()
    assert (rq[3, 1:] % 2 == 0).all()  # the ties went to the even neighbour


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_static_codes_clip_and_match_the_reference_bitwise(dtype):
    x = _activations(48, 1100, 2, torch.float32) * 30
    x[3] = _tie_row(1100, 1e4, 0.5)  # with scale 0.5, x / 0.5 are ties
    x = x.to(dtype)
    input_scale = torch.tensor([0.5])
    q, s = _quantize(x, input_scale)
    rq, rs = R.quantize_activations(x, input_scale)
    assert torch.equal(s, rs) and torch.equal(q, rq)
    assert (rq.abs() == 127).sum() > 20  # values beyond 127 * 0.5 clipped
    assert (rq[3, 1:] % 2 == 0).all()
    q, s = _quantize(x[:3], torch.tensor([0.0]))  # a zero scale maps everything to code 0
    assert not q.any() and not s.any()


# --- the GEMM --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_matches_reference(dtype, static, bias):
    t = _stored(N, K, seed=3, input_scale=0.02 if static else None)
    b = torch.randn(N, generator=torch.Generator().manual_seed(4)).to(dtype) if bias else None
    for M in MS:
        x = _activations(M, K, seed=M, dtype=dtype)
        y = _linear(x, t, b)
        assert y.shape == (M, N) and y.dtype == dtype
        _assert_matches_reference(y, x, t, b)


@pytest.mark.parametrize("k", [40, 300])
def test_small_tiles_cross_every_edge(k):
    """16 x 32 x 32 tiles: 3 row tiles (the last one ragged), 4 column tiles, K in blocks."""
    t = _stored(N, k, seed=5, input_scale=None)
    x = _activations(33, k, seed=6, dtype=torch.bfloat16)
    bias = torch.randn(N).bfloat16()
    y = _linear(x, t, bias, blocks=w8a8.Blocks(16, 32, 32))
    _assert_matches_reference(y, x, t, bias)


def test_leading_dims_and_fp16():
    t = _stored(N, K, seed=7, input_scale=0.05)
    x = _activations(6, K, seed=8, dtype=torch.float16).reshape(2, 3, K)
    y = _linear(x, t)
    assert y.shape == (2, 3, N) and y.dtype == torch.float16
    _assert_matches_reference(y, x, t)


def test_row_does_not_depend_on_batch():
    t = _stored(N, K, seed=9)
    x = _activations(33, K, seed=10, dtype=torch.bfloat16)
    alone = _linear(x[:1], t)
    for M in (5, 33):  # other block sizes, other rows beside it
        assert torch.equal(alone, _linear(x[:M], t)[:1]), f"M={M}"


# --- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_repack_and_layout_bytes(static):
    t = _stored(N, K, seed=11, input_scale=0.02 if static else None)
    if static:
        t["input_scale"] = t["input_scale"].bfloat16()
    w = w8a8.repack(t, torch.bfloat16)
    assert w["qweight"].dtype == torch.int8 and w["qweight"].shape == (K, N)
    assert w["qweight"].is_contiguous() and torch.equal(w["qweight"].T, t["qweight"])
    assert w["scales"].dtype == torch.float32 and torch.equal(w["scales"], t["scales"])
    assert ("input_scale" in w) == static
    if static:
        assert w["input_scale"].dtype == torch.float32 and w["input_scale"].shape == (1,)
    assert w8a8.layout_bytes(N, K, static) == sum(v.nbytes for v in w.values())
    with pytest.raises(ValueError, match="int8"):
        w8a8.repack({"qweight": t["qweight"].to(torch.uint8), "scales": t["scales"]},
                    torch.bfloat16)


@pytest.mark.skipif(DEVICE == "cuda", reason="compares with the CPU kernels in one process")
def test_w8a8_model_on_triton_kernels_gives_the_cpu_logits(tiny_llama, monkeypatch):
    """The path CUDA takes, through the QuantMethod seam: the Triton kernels give the CPU
    kernels' logits on a tiny random Llama. Both compute the reference's integer sums; the
    interpreter rounds fp32 to bf16 differently from the CPU (by an ulp), and that compounds
    over the layers, hence the bound of the other formats' model test (tests/kernels/
    test_triton.py)."""
    from engine import LLM

    ids = list(range(100, 140))
    cpu_logits = LLM(str(tiny_llama), quant="w8a8", progress=False, max_model_len=128).score(ids)
    monkeypatch.setenv("NIBBLE_KERNELS", "triton")
    llm = LLM(str(tiny_llama), quant="w8a8", progress=False, max_model_len=128)
    linears = [m for m in llm.model.quant_linears().values() if str(m.spec) == "w8a8"]
    assert linears and all(m.method.kernel_path(1) == "w8a8-gemm" for m in linears)
    err = (llm.score(ids) - cpu_logits).abs().max().item()
    assert err <= 0.02 * cpu_logits.abs().max().item(), err
