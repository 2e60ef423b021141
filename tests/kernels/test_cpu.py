"""CPU kernels against the reference, over shapes that are not tile-aligned.

The error bound is derived in tests/kernels/cases.py.
"""

from __future__ import annotations

import pytest
import torch

from kernels import cpu, dispatch, native
from kernels import reference as R
from tests.kernels.cases import (
    assert_within_bound,
    magnitude,
    quantize,
    reference,
    script_cpu_clock,
    weights,
)

DTYPES = [torch.bfloat16, torch.float32]
MS = [1, 3, 17, 64]
NS = [96, 200, 960]
KS = [64, 192, 576, 1536]
GROUPS = [32, 64, 128]
# int4's two fast paths: PyTorch's fused op, and nibble's AVX2 kernel where this CPU runs it
INT4_PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(
    native.load() is None, reason=f"no native kernels: {native.supported() or 'build failed'}"))]


def fast_label(native_path: bool) -> str:
    return "cpu-native" if native_path else "cpu-fused"


def _check(fmt: str, N: int, K: int, g: int, dtype: torch.dtype, seed: int,
           native_path: bool | None = None):
    t = quantize(fmt, weights(N, K, seed), g)
    prepare, linear = dispatch.get_kernels(fmt, "cpu")
    if native_path is None:
        prepared = prepare(t, K=K, group_size=g, act_dtype=dtype)
    else:
        prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], g, K, dtype,
                                    native=native_path)
    A = magnitude(fmt, t, K, g)
    x_all = torch.randn(max(MS), K, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for M in MS:
        x = x_all[:M]
        y = linear(x, prepared)
        assert y.dtype == dtype and y.shape == (M, N)
        assert_within_bound(y, reference(fmt, x, t, g), x, A)
    return prepared


@pytest.mark.parametrize("native_path", INT4_PATHS, ids=fast_label)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_int4_matchesreference(N, K, g, dtype, native_path):
    prepared = _check("int4", N, K, g, dtype, seed=N + K + g, native_path=native_path)
    # Every shape here is served by a fast path; ragged groups shrink the kernel group.
    assert prepared.path(1) == fast_label(native_path)
    assert prepared.group_size == min(g, K & -K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_int8_matchesreference(N, K, dtype):
    assert not cpu.is_dense(_check("int8", N, K, 0, dtype, seed=N + K))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("K", [64, 192, 576])
@pytest.mark.parametrize("N", NS)
def test_group_wise_int8_matches_reference(N, K, g, dtype):
    prepared = _check("int8g", N, K, g, dtype, seed=N + K + g)
    assert prepared.path(1) == "cpu-dense"  # dequantized per call: no fused op exists


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_nf4_matchesreference(N, K, g, dtype):
    _check("nf4", N, K, g, dtype, seed=N + K + g)


@pytest.mark.parametrize(
    "fmt,K,dense",
    [
        ("int4", 48, True),  # gcd(48, 32) = 16: no kernel group size; dequantized
        ("int4", 63, True),  # odd K
        ("int4", 96, False),  # kernel group 32
        ("int8", 72, True),  # bf16 with K % 16 != 0 crashes the op; dequantized
        ("int8", 63, True),
    ],
)
def test_unserved_shapes_fall_back_correctly(fmt, K, dense):
    prepared = _check(fmt, 40, K, 32, torch.bfloat16, seed=K)
    assert cpu.is_dense(prepared) is dense


def test_int8_fp32_serves_any_k():
    assert not cpu.is_dense(_check("int8", 40, 72, 0, torch.float32, seed=1))


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_fp16_activations(fmt):
    _check(fmt, 96, 192, 64, torch.float16, seed=3)


@pytest.mark.parametrize("native_path", INT4_PATHS, ids=fast_label)
def test_int4_pads_n(native_path):
    """The fused op packs 16 columns at a time, the native kernel 8: N = 196 is padded to
    208 or 200, and the padding never reaches the output."""
    t = quantize("int4", weights(196, 64, 0), 32)
    prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 32, 64,
                                native=native_path)
    held = prepared.native.shape[0] * 8 if native_path else prepared.packed.shape[0]
    assert held == (200 if native_path else 208) and prepared.N == 196
    x = torch.randn(3, 64).bfloat16()
    assert_within_bound(cpu.linear(x, prepared), reference("int4", x, t, 32), x,
                        magnitude("int4", t, 64, 32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int8g", "int4", "nf4"])
def test_leading_dims_and_bias(fmt, dtype):
    K, N, g = 192, 96, 64
    t = quantize(fmt, weights(N, K, 7), g)
    prepare, linear = dispatch.get_kernels(fmt, "cpu")
    prepared = prepare(t, K=K, group_size=g, act_dtype=dtype)
    x = torch.randn(2, 5, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    y = linear(x, prepared, bias)
    assert y.shape == (2, 5, N) and y.dtype == dtype
    assert_within_bound(y, reference(fmt, x, t, g, bias), x, magnitude(fmt, t, K, g), bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "fmt,K,g",
    [("int8", 576, 0), ("int4", 576, 128), ("nf4", 576, 128), ("int4", 48, 32), ("int8", 72, 0)],
)
def test_row_does_not_depend_on_batch(fmt, K, g, dtype):
    t = quantize(fmt, weights(200, K, 11), g)
    prepare, linear = dispatch.get_kernels(fmt, "cpu")
    prepared = prepare(t, K=K, group_size=g, act_dtype=dtype)
    x = torch.randn(17, K).to(dtype)
    alone, batched = linear(x[:1], prepared), linear(x, prepared)[:1]
    if cpu.is_dense(prepared) and dtype == torch.float32:
        # MKL's fp32 gemv (M=1) and gemm sum in different orders; bf16 and the fused ops don't.
        torch.testing.assert_close(alone, batched, rtol=K * 2.0**-23, atol=1e-6)
    else:
        assert torch.equal(alone, batched)


def test_wrong_activation_dtype_says_how_to_fix():
    t = quantize("int4", weights(96, 64, 0), 32)
    prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 32, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="act_dtype=torch.float32"):
        cpu.linear(torch.randn(1, 64), prepared)


def test_dispatch_backends_and_errors():
    assert dispatch.backend_for("cpu") == "cpu"
    want = "triton" if dispatch.triton_available() else "reference"
    assert dispatch.backend_for(torch.device("cuda", 0)) == want
    with pytest.raises(ValueError, match="valid: int8, int8g, int4, nf4"):
        dispatch.get_kernels("int3", "cpu")
    with pytest.raises(ValueError, match="group_size"):
        dispatch.get_kernels("int4", "cpu")[0]({}, K=64, group_size=None, act_dtype=torch.float32)


def test_int8_misaligned_weight_is_served():
    """Tensors read from safetensors sit at 8-byte offsets; the op crashed on them for M > 1."""
    w = torch.randn(96, 576)
    q, s = R.quantize_int8(w)
    buf = torch.empty(q.numel() + 8, dtype=torch.int8)
    shifted = buf[8:].view(q.shape)
    shifted.copy_(q)
    assert shifted.data_ptr() % 64
    prepared = cpu.int8_prepare(shifted, s, torch.bfloat16)
    x = torch.randn(5, 576, dtype=torch.bfloat16)
    ref = R.int8_linear(x.float(), q, s)
    assert (cpu.linear(x, prepared).float() - ref).abs().max() <= 0.02 * ref.abs().max()


# --- batch-size dispatch: dequantize per call + fp32 GEMM for large M ----------------------


@pytest.mark.parametrize("native_path", INT4_PATHS, ids=fast_label)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt,N,K,g", [("int4", 960, 576, 64), ("int4", 64, 1536, 128),
                                       ("int4", 96, 192, 32), ("int4", 200, 64, 32),
                                       ("int8", 200, 576, 0)])
def test_dense_path_matches_reference(fmt, N, K, g, dtype, native_path):
    """On this machine's own pack layout (or the native kernel's): prepare offers the dense
    path for every int4 shape (N = 96 and 200 end in a partial block on AVX-512, 200 on
    AVX2) and it is right."""
    if fmt == "int8" and native_path:
        pytest.skip("the native kernel is int4 only")
    t = quantize(fmt, weights(N, K, N + K), g)
    prepare, linear = dispatch.get_kernels(fmt, "cpu")
    if fmt == "int4":
        prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], g, K, dtype,
                                    native=native_path)
    else:
        prepared = prepare(t, K=K, group_size=g, act_dtype=dtype)
    assert prepared.dense_from is None  # NIBBLE_TUNE=0: nothing measured, fused only
    if fmt == "int4" and not native_path:
        assert cpu.int4_pack_layout() is not None and prepared.pack is not None
    prepared.dense_from = 3
    A = magnitude(fmt, t, K, g)
    x_all = torch.randn(64, K, generator=torch.Generator().manual_seed(N)).to(dtype)
    for M in MS:
        assert prepared.path(M) == \
            (fast_label(native_path) if M < 3 else "cpu-dense")
        x = x_all[:M]
        y = linear(x, prepared)
        assert y.dtype == dtype and y.shape == (M, N)
        assert_within_bound(y, reference(fmt, x, t, g), x, A)


# --- the int4 pack layout of every CPU capability, whatever this machine's is ----------------
# PyTorch's packer writes the layout of the capability ATen dispatches to. This machine's is
# checked against the real packer here, the lower ones by tests/kernels/test_cpu_capabilities.py
# (this file again under ATEN_CPU_CAPABILITY), and all of them against the dense path below
# through pack_like_torch, which writes what weight_to_int4pack_kernel (int4mm_kernel.cpp,
# torch 2.13) writes on each.

LAYOUTS = {"AVX512": cpu.Int4PackLayout(64, halves=True),
           "AVX2": cpu.Int4PackLayout(32, halves=True),
           "DEFAULT": cpu.Int4PackLayout(32, halves=False)}
# Row counts (multiples of 16) that end in every kind of partial block of 32 and of 64 rows.
PACK_NS = [16, 32, 48, 64, 80, 96, 112, 208, 960]  # 960 last: whole blocks only


def pack_like_torch(q: torch.Tensor, capability: str) -> torch.Tensor:
    """codes int [N, K] (N % 16 == 0) -> uint8 [N, K/2] laid out as the packer does on
    `capability`: rows in blocks; block b's bytes follow block b-1's, k-major; a full block's
    row r goes to byte r mod (B/2) in the low (r < B/2) or high nibble ("halves"), or to byte
    r // 2, low nibble for even r ("pairs", also the partial last block's layout)."""
    layout = LAYOUTS[capability]
    N, K = q.shape
    out = torch.zeros(N * K // 2, dtype=torch.int64)
    for start in range(0, N, layout.block):
        rows = min(layout.block, N - start)
        r = torch.arange(rows)
        if layout.halves and rows == layout.block:
            byte, shift = r % (rows // 2), 4 * (r // (rows // 2))
        else:
            byte, shift = r // 2, 4 * (r % 2)
        k = torch.arange(K)[:, None]
        index = start * K // 2 + k * (rows // 2) + byte  # [K, rows]
        nibbles = q[start:start + rows].T.long() << shift
        out.index_put_((index.reshape(-1),), nibbles.reshape(-1), accumulate=True)
    return out.to(torch.uint8).view(N, K // 2)


def _codes(N: int, K: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.int32)


def test_pack_layout_is_the_one_torch_documents_for_this_capability():
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in LAYOUTS:
        pytest.skip(f"not an x86 capability: {capability}")
    assert cpu.int4_pack_layout() == LAYOUTS[capability]
    for N in PACK_NS:
        q = _codes(N, 192, N)
        assert torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2),
                           pack_like_torch(q, capability)), N


@pytest.mark.parametrize("capability", LAYOUTS)
def test_every_layout_decodes_to_the_codes(capability):
    for N in PACK_NS:
        q = _codes(N, 64, N)
        packed = pack_like_torch(q, capability)
        assert torch.equal(cpu._int4_codes_t(packed, LAYOUTS[capability]), q.T), N
    # The layouts differ (a 16-row tail is pairs on all; 32 rows are pairs on AVX-512 and
    # DEFAULT): on whole blocks none reads another's.
    for other, layout in LAYOUTS.items():
        if layout != LAYOUTS[capability]:
            assert not torch.equal(cpu._int4_codes_t(packed, layout), q.T), other


def test_packed_weights_decode_to_their_codes():
    for N in (96, 200):
        t = quantize("int4", weights(N, 256, 5), 64)
        prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256, native=False)
        codes = R.unpack_nibbles(t["qweight"], 256).to(torch.int32)
        decoded = cpu._int4_codes_t(prepared.packed, cpu.int4_pack_layout())
        assert torch.equal(decoded[:, :N], codes.T)
        assert torch.equal(decoded[:, N:], torch.full((256, -N % 16), 8, dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("capability", LAYOUTS)
@pytest.mark.parametrize("N,K,g", [(960, 576, 64), (208, 192, 32), (48, 128, 128)])
def test_dense_path_reads_every_layout(capability, N, K, g, dtype):
    """Weights packed as `capability` would pack them, served by the dense path (which uses
    no ISA-specific op) on this machine: within the rounding bound of the reference."""
    t = quantize("int4", weights(N, K, N + g), g)
    prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], g, K, dtype, native=False)
    codes = R.unpack_nibbles(t["qweight"], K)
    layout = LAYOUTS[capability]
    prepared.packed, prepared.pack = pack_like_torch(codes, capability), layout
    prepared.dense_from = 1
    x = torch.randn(17, K, generator=torch.Generator().manual_seed(g)).to(dtype)
    assert prepared.path(1) == "cpu-dense"
    assert_within_bound(cpu.linear(x, prepared), reference("int4", x, t, g), x,
                        magnitude("int4", t, K, g))


def test_unknown_pack_layout_keeps_the_fused_op(monkeypatch, caplog):
    """A packer this version cannot read (as a future PyTorch's might be): no dense path, the
    fused op serves every M, and the log says why."""
    real = cpu._int4_pack

    def reversed_rows(q):  # the real layout with each row's bytes in reverse order
        return real(q).flip(-1).contiguous()

    monkeypatch.setattr(cpu, "_int4_pack", reversed_rows)
    cpu.int4_pack_layout.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="nibble.kernels"):
            assert cpu.int4_pack_layout() is None
        assert "fused op at every batch size" in caplog.text
        t = quantize("int4", weights(64, 256, 1), 64)
        prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256, native=False)
    finally:
        monkeypatch.undo()
        cpu.int4_pack_layout.cache_clear()
    assert prepared.pack is None and prepared.dense_from is None
    assert [prepared.path(M) for M in (1, 512)] == ["cpu-fused", "cpu-fused"]


@pytest.mark.parametrize("native_path", INT4_PATHS, ids=fast_label)
def test_dense_crossover_is_measured_once_per_shape(monkeypatch, caplog, native_path):
    """A scripted clock: dense is faster from M=128 up, so calls of 128 rows and more take it;
    batch_invariant and NIBBLE_TUNE=0 keep the fused op (or the native kernel)."""
    timed, _ = script_cpu_clock(monkeypatch, "_dense_rows", lambda M: M >= 128)
    t = quantize("int4", weights(64, 256, 1), 64)
    fast = fast_label(native_path)
    with caplog.at_level("INFO", logger="nibble.kernels"):
        prepared = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256,
                                    native=native_path)
    assert prepared.dense_from == 128
    # largest first, stopping at the first M where the fused op wins
    assert timed == [(512, True), (512, False), (256, True), (256, False), (128, True),
                     (128, False), (64, True), (64, False)]
    assert "dequantize + fp32 GEMM from M 128" in caplog.text
    assert [prepared.path(m) for m in (1, 127, 128, 512)] == \
        [fast, fast, "cpu-dense", "cpu-dense"]
    timed.clear()
    again = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256, native=native_path)
    assert again.dense_from == 128 and not timed  # same shape: not measured again
    pinned = cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256,
                              batch_invariant=True, native=native_path)
    assert pinned.dense_from is None
    monkeypatch.setenv("NIBBLE_TUNE", "0")
    assert cpu.int8_prepare(t["qweight"].view(torch.int8)[:, :128].contiguous(),
                            torch.ones(64)).dense_from is None


def test_measured_choices_are_stored_and_reused_by_later_processes(monkeypatch):
    """The first process measures and stores; a later one (nothing in memory) reads the stored
    choice without timing anything, so both run the same kernels; NIBBLE_RETUNE=1 measures
    again and replaces what is stored."""
    import json

    timed, _ = script_cpu_clock(monkeypatch, "_dense_rows", lambda M: M >= 128)
    t = quantize("int4", weights(64, 256, 1), 64)

    def prepare():
        return cpu.int4_prepare(t["qweight"], t["scales"], t["zeros"], 64, 256, native=False)

    assert prepare().dense_from == 128 and timed
    stored = json.loads(cpu.cache_path().read_text())
    assert list(stored.values()) == [128]
    assert cpu.choices() == [{"key": next(iter(stored)), "value": 128, "source": "measured"}]

    monkeypatch.setattr(cpu, "_MEASURED", {})  # a new process
    timed.clear()
    assert prepare().dense_from == 128 and not timed
    assert [c["source"] for c in cpu.choices()] == ["cached"]

    monkeypatch.setattr(cpu, "_MEASURED", {})
    monkeypatch.setenv("NIBBLE_RETUNE", "1")
    monkeypatch.setattr(cpu, "_median_seconds", lambda fn, x, reps=3: 1.0)  # dense never wins
    assert prepare().dense_from is None
    assert list(json.loads(cpu.cache_path().read_text()).values()) == [None]
    assert [c["source"] for c in cpu.choices()] == ["measured"]


def _fp16_gemm_wins(monkeypatch):
    """A scripted clock on which fbgemm's fp16 GEMM beats F.linear."""
    script_cpu_clock(monkeypatch, "fp16_gemm", lambda M: True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_through_the_fp16_gemm_matches_reference(monkeypatch, dtype):
    _fp16_gemm_wins(monkeypatch)
    prepared = _check("nf4", 200, 576, 64, dtype, seed=3)
    if dtype == torch.float32:  # fp32 weights stay with F.linear (fp16 would round them)
        assert not isinstance(prepared, cpu.Fp16Gemm)
        return
    assert isinstance(prepared, cpu.Fp16Gemm) and prepared.packed is not None
    pinned = cpu.nf4_prepare(*[quantize("nf4", weights(200, 576, 3), 64)[k]
                               for k in ("qweight", "absmax")], 64, 576, dtype,
                             batch_invariant=True)
    assert isinstance(pinned, cpu.Dense) and pinned.weight is not None


def test_bf16_layers_take_the_fp16_gemm_where_it_wins(monkeypatch):
    """engine/quant/fp.py: an untied 16-bit layer lets its weight go for the packed copy; a
    tied lm_head keeps the shared weight and counts the copy as extra bytes."""
    from engine.config import QuantSpec
    from engine.quant.fp import FloatMethod

    _fp16_gemm_wins(monkeypatch)
    w = weights(96, 192, 4).to(torch.bfloat16)
    x = torch.randn(5, 192).to(torch.bfloat16)
    want = x.float() @ w.float().T
    for shared in (False, True):
        m = FloatMethod(QuantSpec("bf16"), 192, 96, torch.bfloat16)
        m.load({"weight": w})
        m.shared = shared
        m.prepare(torch.device("cpu"))
        assert m._fp16_gemm is not None
        assert (m.weight is not None) is shared
        # fbgemm holds K in whole blocks of 512 rows: 192 inputs take 512 (N = 96 fills its
        # column blocks of 16 and 32)
        assert m.extra_bytes == (512 * 96 * 2 if shared else 0)
        y = m.apply(x, None)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), want, rtol=2**-7, atol=1e-3)


def test_a_build_lock_left_behind_does_not_hang_the_process(tmp_path, monkeypatch, caplog):
    """A build killed mid-way leaves the directory's lock file; PyTorch's loader would wait on
    it forever. load() waits a bounded time, then serves with PyTorch's ops and names the
    file; without the file it goes on to build."""
    monkeypatch.setattr(native, "LOCK_WAIT_S", 0.2)
    lock = tmp_path / "lock"
    lock.touch()
    with caplog.at_level("WARNING", logger="nibble.kernels"):
        assert native._wait_for_other_build(lock) is False
    assert str(lock) in caplog.text and "delete that file" in caplog.text
    monkeypatch.setenv("NIBBLE_KERNELS_DIR", str(tmp_path))
    if native.supported() is None:  # the whole load gives up the same way, without building
        assert native.load.__wrapped__() is None
        assert not list(tmp_path.glob("*.so"))
    lock.unlink()
    assert native._wait_for_other_build(lock) is True
