"""Triton kernels against the reference: every path, format, group size and activation dtype.

On a machine without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py
sets it), on a GPU machine compiled on CUDA. Shapes are small so the interpreter stays quick,
and chosen to cross tile edges: N = 200 is no multiple of any BLOCK_N, K = 320 leaves a ragged
last group of 64 at g = 128, K = 99 a ragged word of codes.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton")

from kernels import dispatch, formats  # noqa: E402
from kernels import reference as R  # noqa: E402
from kernels.triton import layout, qgemm, tuning  # noqa: E402
from kernels.triton.qgemm import KernelConfig  # noqa: E402
from tests.kernels.cases import (  # noqa: E402
    assert_within_bound,
    magnitude,
    quantize,
    reference,
    weights,
)

DEVICE = "cuda" if torch.cuda.is_available() and not qgemm.interpreting() else "cpu"
# On a GPU machine every test here runs compiled on CUDA and `pytest -m gpu` selects them.
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
needs_interpreter = pytest.mark.skipif(
    not qgemm.interpreting(), reason="runs Triton on CPU tensors, which needs the interpreter")
DTYPES = [torch.bfloat16, torch.float16]
MS = [1, 3, 17, 64]
N = 200

PATHS = {
    "tiled": KernelConfig(block_m=32, block_n=64, block_k=32),
    "tiled-wide": KernelConfig(block_m=64, block_n=128, block_k=64),
    "split-k": KernelConfig(block_m=16, block_n=128, block_k=64, split_k=3),
    "gemv": KernelConfig(block_m=4, block_n=64, block_k=32, split_k=2, use_dot=False),
    "dequant-matmul": KernelConfig(dense=True),
    "tiled-planes": KernelConfig(block_m=32, block_n=128, block_k=128, planes=True),
    "split-k-planes": KernelConfig(block_m=16, block_n=128, block_k=128, split_k=2, planes=True),
    "gemv-planes": KernelConfig(block_m=4, block_n=128, block_k=64, use_dot=False, planes=True),
}
# Every M for the main launches; the variants of a launch share its code except for one
# branch, so two M each keep the interpreter's time in check (gemv serves M <= 4 only).
PATH_MS = {"tiled": MS, "split-k": MS, "dequant-matmul": MS, "tiled-wide": [17, 64],
           "gemv": [1, 3], "tiled-planes": [3, 64], "split-k-planes": [1, 17],
           "gemv-planes": [1, 3]}


def _triton_magnitude(fmt: str, t: dict, K: int, g: int) -> torch.Tensor:
    """int4 computes q * s + (z - 8s) here (see tests/kernels/cases.py for the bound)."""
    return magnitude(fmt, t, K, g, offsets=True)


def _case(fmt: str, K: int, g: int, dtype: torch.dtype, seed: int):
    t = quantize(fmt, weights(N, K, seed), g)
    w = formats.get(fmt).triton_layout.repack({k: v.to(DEVICE) for k, v in t.items()}, K, g, dtype)
    x = torch.randn(max(MS), K, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return t, w, x


def _run(fmt, w, x, g, cfg, bias=None):
    y = qgemm.linear(x.to(DEVICE), w, formats.get(fmt).triton_layout.code, g, N,
                     None if bias is None else bias.to(DEVICE), cfg)
    return y.cpu()


def _check_paths(fmt: str, K: int, g: int, dtype: torch.dtype, paths: list[str]):
    t, w, x_all = _case(fmt, K, g, dtype, seed=K + g)
    A = _triton_magnitude(fmt, t, K, g)
    for name in paths:
        cfg = PATHS[name]
        for M in PATH_MS[name]:
            x = x_all[:M]
            y = _run(fmt, w, x, g, cfg)
            assert y.dtype == dtype and y.shape == (M, N), name
            assert_within_bound(y, reference(fmt, x, t, g), x, A, roundings=3)


# Compiled on a GPU: every group size with every dtype. Under the interpreter a dtype changes
# only the loads' and stores' casts (dots run in fp32), and the full product took half of this
# file's time, so each group size runs with one dtype and each dtype with two group sizes.
GROUP_DTYPES = ([(g, d) for g in (32, 64, 128) for d in DTYPES] if DEVICE == "cuda" else
                [(32, torch.bfloat16), (64, torch.float16), (128, torch.bfloat16),
                 (128, torch.float16)])


@pytest.mark.parametrize("g, dtype", GROUP_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_grouped_formats_match_reference(fmt, g, dtype):
    _check_paths(fmt, 320, g, dtype, list(PATHS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_matches_reference(dtype):
    _check_paths("int8", 320, 0, dtype, list(PATHS))


@pytest.mark.parametrize("g, dtype", [(32, torch.bfloat16), (128, torch.float16)], ids=str)
def test_group_wise_int8_matches_reference(g, dtype):
    _check_paths("int8g", 320, g, dtype, ["tiled", "split-k", "gemv", "dequant-matmul"])


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8", "int8g"])
def test_k_not_a_multiple_of_8(fmt):
    _check_paths(fmt, 99, 32, torch.bfloat16, ["tiled", "split-k", "split-k-planes"])


def test_symmetric_int4():
    t = {k: v for k, v in zip(("qweight", "scales", "zeros"),
                              R.quantize_int4(weights(N, 128, 5), 64, symmetric=True), strict=True)}
    w = layout.INT4.repack({k: v.to(DEVICE) for k, v in t.items()}, 128, 64, torch.float16)
    x = torch.randn(5, 128).half()
    assert_within_bound(_run("int4", w, x, 64, PATHS["tiled"]), reference("int4", x, t, 64), x,
                        _triton_magnitude("int4", t, 128, 64), roundings=3)


@pytest.mark.parametrize("path", ["tiled", "split-k", "dequant-matmul"])
def test_bias_and_leading_dims_through_dispatch(path, monkeypatch):
    monkeypatch.setenv("NIBBLE_TUNE", "0")  # the plan is set below; don't time candidates
    K, g = 192, 64
    t = quantize("int4", weights(N, K, 9), g)
    prepare, linear = dispatch.get_kernels("int4", "triton")
    prepared = prepare({k: v.to(DEVICE) for k, v in t.items()}, K=K, group_size=g,
                       act_dtype=torch.bfloat16)
    prepared.plan = (PATHS[path],) * len(tuning.M_BUCKETS)
    x, bias = torch.randn(2, 3, K).bfloat16(), torch.randn(N).bfloat16()
    y = linear(x.to(DEVICE), prepared, bias.to(DEVICE)).cpu()
    assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
    assert_within_bound(y, reference("int4", x, t, g, bias), x,
                        _triton_magnitude("int4", t, K, g), bias, roundings=3)
    assert prepared.path(6) == path


@pytest.mark.parametrize("path", ["tiled", "tiled-wide", "tiled-planes", "gemv", "dequant-matmul"])
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_row_does_not_depend_on_batch(fmt, path):
    _, w, x = _case(fmt, 320, 128, torch.bfloat16, seed=4)
    cfg = PATHS[path]
    alone = _run(fmt, w, x[:1], 128, cfg)
    for M in (3, 17) if not path.startswith("gemv") else (3,):
        assert torch.equal(alone, _run(fmt, w, x[:M], 128, cfg)[:1]), f"M={M}"


def test_layout_round_trip():
    for K in (1, 7, 8, 99, 320):
        codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
        words = layout.pack_k_major(codes)
        assert words.dtype == torch.int32 and words.shape == (-(-K // 8), N)
        assert torch.equal(layout.unpack_k_major(words, K), codes)
    # code k sits in bits 4*(k % 8): k = 7 is the top nibble, which makes the word negative
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, 7] = 0xF
    assert layout.pack_k_major(codes).item() == -(2**28)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8", "int8g"])
def test_layout_dequantizes_to_the_stored_weights(fmt):
    t = quantize(fmt, weights(N, 320, 2), 128)
    lay = formats.get(fmt).triton_layout
    w = lay.repack(t, 320, 128, torch.float32)
    ref = {"int4": lambda: R.dequantize_int4(t["qweight"], t["scales"], t["zeros"], 128, 320),
           "int8g": lambda: R.dequantize_int8g(t["qweight"], t["scales"], t["zeros"], 128, 320),
           "nf4": lambda: R.dequantize_nf4(t["qweight"], t["absmax"], 128, 320),
           "int8": lambda: R.dequantize_int8(t["qweight"], t["scales"])}[fmt]()
    torch.testing.assert_close(lay.dequantize(w, 320, 128), ref, rtol=0, atol=1e-6)


# --- dispatch and tuning ---------------------------------------------------------------------


def test_bucket_index():
    assert [tuning.M_BUCKETS[tuning.bucket_index(m)] for m in (1, 2, 3, 16, 17, 256, 257, 4096)] \
        == [1, 2, 4, 16, 32, 256, 256, 256]


def test_tuner_picks_the_fastest_path_per_bucket_and_caches_it(tmp_path, caplog, monkeypatch):
    """A scripted timer: the fused split-k kernel wins up to M = 16, dequant-matmul beyond
    (later: everywhere)."""
    timed, dense_everywhere = [], []

    def timer(fn):
        fn()
        cfg, M = timed[-1]
        fused_small = cfg.split_k == 4 and cfg.block_n == 64 and cfg.block_k == 64
        if M <= 16 and not dense_everywhere:
            return 1.0 if fused_small else 2.0
        return 1.0 if cfg.dense else 3.0

    t = quantize("int4", weights(64, 64, 0), 32)
    w = layout.INT4.repack(t, 64, 32, torch.bfloat16)

    def run(x, cfg):
        timed.append((cfg, x.shape[0]))
        return torch.zeros(x.shape[0], 64)

    path = tmp_path / "gpu.json"
    with caplog.at_level(logging.INFO, logger="nibble.kernels"):
        plan = tuning.plan_for("k", run, 64, torch.bfloat16, torch.device("cpu"), timer, path)
    assert [c.label for c in plan] == ["split-k"] * 5 + ["dequant-matmul"] * 4
    assert "M 1-16: split-k; M 17-256+: dequant-matmul" in caplog.text
    assert {M for _, M in timed} == set(tuning.M_BUCKETS)

    def no_timer(fn):
        raise AssertionError("a cached plan must not be measured again")

    tuning._MEMO.clear()  # as in a new process: the plan must come from the file
    assert tuning.plan_for("k", run, 64, torch.bfloat16, torch.device("cpu"), no_timer,
                           path) == plan

    tuning._MEMO.clear()  # NIBBLE_RETUNE=1: measured again, and the file holds the new plan
    monkeypatch.setenv("NIBBLE_RETUNE", "1")
    dense_everywhere.append(True)
    plan = tuning.plan_for("k", run, 64, torch.bfloat16, torch.device("cpu"), timer, path)
    assert [c.label for c in plan] == ["dequant-matmul"] * 9
    monkeypatch.delenv("NIBBLE_RETUNE")
    tuning._MEMO.clear()
    assert tuning.plan_for("k", run, 64, torch.bfloat16, torch.device("cpu"), no_timer,
                           path) == plan
    del w


def test_untuned_plan_off_gpu(caplog):
    tuning._MEMO.clear()
    with caplog.at_level(logging.INFO, logger="nibble.kernels"):
        plan = tuning.plan_for("k", None, 64, torch.bfloat16, torch.device("cpu"))
    assert plan == tuning.DEFAULT_PLAN and "untuned" in caplog.text


def test_cuda_gets_the_triton_backend():
    assert dispatch.backend_for(torch.device("cuda", 0)) == "triton"


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_tuning_measures_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path))
    t = quantize("int4", weights(256, 256, 0), 128)
    prepare, _ = dispatch.get_kernels("int4", "triton")
    prepared = prepare({k: v.cuda() for k, v in t.items()}, K=256, group_size=128,
                       act_dtype=torch.float16)
    assert len(prepared.plan) == len(tuning.M_BUCKETS)
    assert list((tmp_path / "tuning").glob("*.json"))


# --- the model through the QuantMethod seam ---------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("quant", ["int4", "int8", "nf4", "int8-g32"])
def test_quantized_model_runs_on_triton_kernels(tiny_llama, monkeypatch, quant):
    """The path CUDA takes: the same QuantMethods, prepared by the Triton backend, give the
    CPU ops' logits on a tiny random Llama (the layers are untouched)."""
    from engine import LLM

    ids = list(range(100, 140))
    cpu_logits = LLM(str(tiny_llama), quant=quant, progress=False, max_model_len=128).score(ids)
    monkeypatch.setenv("NIBBLE_KERNELS", "triton")
    llm = LLM(str(tiny_llama), quant=quant, progress=False, max_model_len=128)
    linears = [m for m in llm.model.quant_linears().values() if str(m.spec) == quant]
    assert linears and all(hasattr(m.method._prepared, "plan") for m in linears)
    assert linears[0].method.kernel_path(1) == tuning.DEFAULT_PLAN[0].label
    logits = llm.score(ids)
    err = (logits - cpu_logits).abs().max().item()
    assert err <= 0.02 * cpu_logits.abs().max().item(), err


@needs_interpreter
def test_cli_logs_the_kernel_dispatch(tiny_llama):
    """A user sees once per layer shape which path serves which batch sizes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NIBBLE_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "server.cli", "generate", "-m", str(tiny_llama),
                           "-q", "int4", "--max-tokens", "2", "hello"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "kernel dispatch" in ln]
    # q|k|v, o, gate|up and down: four distinct int4 shapes in a 2-layer model
    assert len(lines) == 4, proc.stderr
    assert "M 1-16: split-k; M 17-256+: tiled" in lines[0]


@needs_interpreter
def test_decode_steps_run_the_paged_attention_kernel(tiny_llama, monkeypatch):
    """On the Triton backend a decode step's attention is the paged kernel: a batch of two
    prompts of different lengths generates tokens whose logprobs are the teacher-forced ones
    of the CPU path."""
    from engine import LLM, SamplingParams
    from kernels.triton import paged_attention

    prompts = [list(range(100, 140)), list(range(300, 323))]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    cpu = LLM(str(tiny_llama), quant="int8", progress=False, max_model_len=128)
    monkeypatch.setenv("NIBBLE_KERNELS", "triton")
    calls = []
    kernel = paged_attention.paged_decode_attention
    monkeypatch.setattr(paged_attention, "paged_decode_attention",
                        lambda q, *a: calls.append(q.shape[0]) or kernel(q, *a))
    llm = LLM(str(tiny_llama), quant="int8", progress=False, max_model_len=128)
    assert llm.engine.runner.decode_kernel == "triton"
    outs = llm.generate(prompts, params)
    assert calls and max(calls) == 2  # both sequences decode in one launch
    for prompt, out in zip(prompts, outs, strict=True):
        logits = cpu.score(prompt + out.token_ids[:-1])[len(prompt) - 1:]
        want = torch.log_softmax(logits, -1)
        got = torch.tensor([lp[t] for lp, t in zip(out.outputs[0].logprobs, out.token_ids,
                                                         strict=True)])
        ref = want[torch.arange(len(got)), torch.tensor(out.token_ids)]
        assert (got - ref).abs().max().item() < 0.02
