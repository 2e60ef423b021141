"""`nibble plan`'s memory estimate against what loads hold, and the refusal before loading."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine import LLM, build, plan
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.report import module_weights
from server import cli
from tests.conftest import DEFAULT_MODEL

# The bound the estimate is held to (issue: "within 10% of the resident memory measured after
# loading, for every format"); it is the requirement itself, not fitted to the numbers.
ESTIMATE_BOUND = 0.10


@pytest.mark.parametrize("size,want", [("8GiB", 8 * 2**30), ("120MB", 120 * 10**6),
                                       ("2.5e9", 2_500_000_000), (" 512 kib ", 512 * 1024),
                                       (4096, 4096)])
def test_sizes(size, want):
    assert plan.parse_bytes(size) == want


@pytest.mark.parametrize("size", ["", "8 GiBs", "-1GB", "0", "1e999", "lots"])
def test_bad_sizes_say_how_to_write_one(size):
    with pytest.raises(ConfigError, match="size"):
        plan.parse_bytes(size)


@pytest.mark.parametrize("quant", ["bf16", "int4", "int8", "nf4"])
def test_weights_are_what_inspect_counts(llm_factory, quant):
    """The stored bytes estimated from shapes equal those of the loaded model, row by row as
    `nibble inspect` counts them (its fp16 GEMM copies are the kernels' share, not weights)."""
    llm = llm_factory(quant)
    est = plan.estimate(llm.config)
    stored = sum(r.nbytes for r in module_weights(llm.model) if "GEMM copy" not in r.name)
    assert est.weights == stored
    assert est.kv_cache == llm.engine.runner.cache.nbytes


def test_estimate_within_bound_of_measured_growth():
    """Fresh processes load the default model in each format; the estimate made here from
    the headers alone is within ESTIMATE_BOUND of each one's resident growth over LLM(...)."""
    from benchmarks.load_memory import measure

    quants = ["bf16", "int4", "int8", "nf4"]
    env = {**os.environ, "NIBBLE_TUNE": "0"}  # as here (tests/conftest.py)

    def one(quant: str) -> dict:
        return measure(DEFAULT_MODEL, "released", quant, max_model_len=2048, env=env,
                       estimate=False)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, quants))
    for quant, r in zip(quants, results, strict=True):
        est = plan.estimate(EngineConfig(quant=quant, max_model_len=2048, kv_cache_memory=16e6))
        grown = r["after"]["VmRSS"] - r["before"]["VmRSS"]
        assert est.kv_cache == r["kv_cache_bytes"]
        assert abs(est.resident - grown) <= ESTIMATE_BOUND * grown, (quant, est, grown)


def test_llm_refuses_before_loading(monkeypatch):
    """A KV cache larger than the machine: LLM(...) stops before a weight is read, saying what
    it needs and what would fit."""
    def no_load(*args, **kwargs):
        raise AssertionError("loaded")

    monkeypatch.setattr(build, "load", no_load)
    with pytest.raises(ConfigError) as exc:
        LLM(DEFAULT_MODEL, quant="int4", kv_cache_memory=1e14, progress=False)
    text = str(exc.value)
    assert "needs about" in text and "KV cache" in text and "room for" in text


def test_serve_refuses_what_cannot_fit_together(capsys, monkeypatch):
    """Two variants whose KV caches fit alone but not together: the server exits 2 with one
    line before loading either."""
    monkeypatch.setattr(build, "load", lambda *a, **k: pytest.fail("loaded"))
    half = plan.device_memory("cpu") * 0.55
    rc = cli.main(["serve", "--port", "0", "--variants", "int4,int8",
                   "--kv-cache-memory", str(half)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("nibble: error: smollm2-135m needs about") and "int8:" in err[-1]


@pytest.mark.parametrize("argv,words", [
    (["plan", "--memory", "lots"], "not a size"),
    (["plan", "--concurrency", "0"], "--concurrency"),
    (["plan", "--context", "100000"], "exceeds the context length"),
    (["plan", "-q", "int3"], "unknown quantization"),
])
def test_plan_errors_exit_2_with_one_line(argv, words, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0], err


def test_plan_table_and_json(capsys):
    import json

    assert cli.main(["plan", "--memory", "700MiB", "--context", "2048", "--concurrency", "4",
                     "--formats", "bf16,int4"]) == 0
    table = capsys.readouterr().out
    assert "int4" in table and "bf16" in table
    assert cli.main(["plan", "--memory", "700MiB", "--context", "2048", "--concurrency", "4",
                     "--formats", "bf16,int4", "--json"]) == 0
    rows = {e["quant"]: e for e in json.loads(capsys.readouterr().out)["estimates"]}
    cfg = EngineConfig(max_model_len=2048)
    per_token = rows["int4"]["kv_cache"] // rows["int4"]["kv_tokens"]
    assert rows["int4"]["kv_tokens"] == 4 * 2048 and per_token == rows["bf16"]["kv_cache"] // (4 * 2048)
    assert rows["int4"]["weights"] < rows["bf16"]["weights"]
    for e in rows.values():  # each row is the sum of its parts, judged against the budget
        assert e["peak"] == e["weights"] + e["kernels"] + e["kv_cache"] + e["workspace"] + e["runtime"]
        assert e["fits"] == (e["peak"] <= 700 * 2**20)
    assert plan.estimate(cfg, concurrency=4).kv_cache == rows["bf16"]["kv_cache"]


def test_scan_then_plan_from_the_command_line(tiny_llama, tmp_path, capsys):
    """`nibble plan --scan` writes the scan; `--from-scan ... --weight-budget` writes a config
    within the budget that loads with the planned formats."""
    import json

    from engine.config_files import read_config
    from engine.report import total_bytes

    scan_dir = tmp_path / "scan"
    assert cli.main(["plan", "--scan", "-m", str(tiny_llama), "--formats", "int4-g32,int8",
                     "--calib-tokens", "128", "--calib-ctx", "32", "--out", str(scan_dir)]) == 0
    assert (scan_dir / "scan.png").stat().st_size > 0
    scan = json.loads((scan_dir / "scan.json").read_text())
    assert len(scan["modules"]) == 9  # 2 layers x 4 groups, and lm_head
    wide = scan["fixed_bytes"] + sum(m["wide_bytes"] for m in scan["modules"])
    budget = wide - 3 * 2**20  # room for most modules to stay 16-bit, not all
    out = tmp_path / "plan.toml"
    assert cli.main(["plan", "--from-scan", str(scan_dir / "scan.json"), "--weight-budget",
                     str(budget), "--out", str(out)]) == 0
    assert "measure it: nibble compare" in capsys.readouterr().out
    cfg = EngineConfig.from_dict(read_config(str(out)))
    llm = LLM(config=cfg, progress=False)
    formats = {str(lin.spec) for lin in llm.model.quant_linears().values()}
    assert total_bytes(llm.model) <= budget and len(formats) > 1


@pytest.mark.parametrize("argv,words", [
    (["plan", "--weight-budget", "10MB"], "plans from a scan"),
    (["plan", "--from-scan", "missing.json", "--weight-budget", "1GB"], "cannot read the scan"),
    (["plan", "--scan", "-q", "int4"], "drop --quant"),
    (["plan", "--scan", "--calib", "missing.txt"], "calibration text"),
    (["plan", "--scan", "--calib-tokens", "100"], "at least two chunks"),
    (["plan", "--scan", "--from-scan", "x.json"], "not both"),
    (["plan", "--scan", "--formats", "bf16"], "quantized formats only"),
    (["plan", "--weight-budget", "12 parsecs", "--scan"], "not a size"),
])
def test_scan_and_plan_errors_exit_2_with_one_line(argv, words, capsys, tiny_llama):
    rc = cli.main([*argv, "-m", str(tiny_llama)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0], err


def test_cuda_estimate_without_a_gpu_takes_the_budget(capsys):
    """Planning for a GPU on a machine without one: the Triton layouts are counted from
    shapes, the budget is the one given, and without one the error says to give it."""
    gpu = plan.estimate(EngineConfig(quant="int4", device="cuda"), memory=80 * 10**9)
    cpu = plan.estimate(EngineConfig(quant="int4"), memory=80 * 10**9)
    assert gpu.budget == 80 * 10**9
    norms = 2 * 30 + 1  # fp32 beside the residual stream on CPU, bf16 on CUDA
    assert cpu.weights - gpu.weights == norms * 576 * 2
    assert gpu.kv_cache * 2 == cpu.kv_cache  # a bf16 KV cache on CUDA, fp32 on CPU
    assert gpu.runtime - cpu.runtime == plan.CUDA_CONTEXT
    assert gpu.kernels != cpu.kernels  # Triton's layout, not the CPU kernels'
    if not torch.cuda.is_available():
        assert cli.main(["plan", "--device", "cuda"]) == 2
        assert "give the budget" in capsys.readouterr().err
