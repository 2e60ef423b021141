"""The numbers of a load-test report from per-request records, without a server: percentiles,
goodput under an SLO, refusals apart from errors, series over time, the /metrics
cross-check, SLO files, and the ramp's search for capacity."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ConfigError
from loadtests import bench
from loadtests.report import SLO, cross_check, percentile, series, summarize


def rec(start, ttft=0.1, gaps=(0.05,) * 3, ok=True, status=200, tokens=None, error=None):
    gaps = list(gaps)
    r = {"start": start, "end": start + ttft + sum(gaps), "status": status, "ok": ok}
    if ok:
        r.update(ttft=ttft, gaps=gaps, tokens=tokens or len(gaps) + 1, chunks=len(gaps) + 1)
    if error or not ok:
        r["error"] = error or str(status)
    return r


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    xs = list(rng.exponential(size=101))
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert percentile([], 50) is None


def test_goodput_counts_requests_within_both_limits():
    slo = SLO(ttft_p99_ms=500, itl_p99_ms=100, goodput_ratio=0.9)
    records = [rec(0.0), rec(1.0), rec(2.0, ttft=0.8),  # TTFT over the limit
               rec(3.0, gaps=(0.2, 0.2, 0.2)),  # mean inter-token latency over the limit
               rec(4.0, ok=False, status=429), rec(5.0, ok=False, status=503),
               rec(6.0, ok=False, status=200, error="the stream ended without [DONE]"),
               {"start": 7.0, "end": 7.0, "status": 0, "ok": False, "error": "client_saturated"}]
    s = summarize(records, slo, window=10.0)
    req = s["requests"]
    assert (req["sent"], req["ok"], req["refused_429"], req["server_errors_5xx"],
            req["other_errors"], req["client_saturated"]) == (7, 4, 1, 1, 2, 1)
    assert s["goodput"]["good"] == 2 and s["goodput"]["ratio"] == pytest.approx(2 / 7, abs=1e-4)
    assert s["goodput"]["requests_per_s"] == pytest.approx(0.2)
    assert s["offered_rps"] == pytest.approx(0.7)
    assert s["throughput"]["output_tokens"] == 16
    # p99 TTFT of the accepted requests is the 0.8 s one: over 500 ms; errors other than 429 fail
    assert s["ttft_ms"]["p99"] > 500 and not s["slo"]["checks"]["ttft_p99"]
    assert not s["slo"]["checks"]["no_errors"] and not s["slo"]["pass"]


def test_refusals_alone_do_not_fail_the_slo():
    slo = SLO(ttft_p99_ms=500, itl_p99_ms=100)
    s = summarize([rec(0.0), rec(0.5), rec(1.0, ok=False, status=429)], slo, window=2.0)
    assert s["slo"]["pass"] and s["requests"]["refused_429"] == 1
    assert s["itl_ms"]["p50"] == pytest.approx(50.0)


def test_series_counts_every_token_once_at_its_arrival():
    records = [rec(float(i) * 0.7, gaps=(0.3,) * 9, tokens=10) for i in range(6)]
    s = series(records, origin=0.0, bucket=1.0)
    assert sum(s["tokens_per_s"]) == pytest.approx(60)  # bucket of 1 s: tokens/s sums to tokens
    assert sum(s["requests_per_s"]) == pytest.approx(6)
    assert s["t"][0] == 0.5 and len(s["t"]) == len(s["itl_p99_ms"])
    assert all(v is None or v == pytest.approx(300) for v in s["itl_p50_ms"])


def test_cross_check_flags_a_token_disagreement():
    records = [rec(0.0, tokens=8), rec(1.0, tokens=8)]
    name = "nibble_generation_tokens_total"
    agree = cross_check(records, {name: 100.0}, {name: 116.0}, max_tokens=8)
    assert agree["agree"] and agree["tokens"]["diff"] == 0
    off = cross_check(records, {name: 100.0}, {name: 160.0}, max_tokens=8)
    assert not off["agree"] and "disagree" in off["notes"][0]
    other = cross_check(records, {}, {"vllm:generation_tokens_total": 16.0}, max_tokens=8)
    assert other["agree"] and other["tokens"]["metric"] == "vllm:generation_tokens_total"
    assert "no generated-token counter" in cross_check(records, {}, {}, 8)["notes"][0]


def test_slo_files(tmp_path):
    assert SLO.load("slo-cpu").goodput_ratio == 0.9
    good = tmp_path / "slo.toml"
    good.write_text("[slo]\nttft_p99_ms = 300\nitl_p99_ms = 40\n")
    assert SLO.load(str(good)) == SLO(ttft_p99_ms=300, itl_p99_ms=40)
    for text, message in (("ttft_p99 = 3", "unknown SLO keys"), ("goodput_ratio = 2", "goodput_ratio"),
                          ("ttft_p99_ms = ", "not valid TOML")):
        good.write_text(text)
        with pytest.raises(ConfigError, match=message):
            SLO.load(str(good))
    with pytest.raises(ConfigError, match="presets: slo-cpu"):
        SLO.load("no-such-slo")


IMPORT_ORDER = """
import sys
from loadtests.report import SLO
assert SLO.load("slo-cpu").goodput_ratio == 0.9
leaked = sorted(m for m in sys.modules if m == "server" or m.startswith("server."))
assert not leaked, f"reading an SLO file imported {leaked}"
from server.cli import build_parser, engine_config
from server import commands
from loadtests import bench
args = build_parser().parse_args(["generate", "-c", "mixed-attn-int8-mlp-int4", "hi"])
assert engine_config(args).quant == "int4"
assert commands.variant_config("mixed-attn-int8-mlp-int4", engine_config(args))[1].rules
print("ok")
"""


def test_slo_files_are_read_without_the_command_line():
    """loadtests.report first, in a fresh interpreter: reading an SLO preset leaves server/
    unimported (config files are engine/config_files.py's, so there is no loadtests -> server
    -> loadtests cycle), and server.cli, server.commands and loadtests.bench import after it."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", IMPORT_ORDER], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_ramp_finds_the_highest_rate_that_holds(monkeypatch, tmp_path):
    """The ramp multiplies the rate until goodput falls below the ratio, then bisects: with a
    server that holds up to 1.3 req/s, stages run 0.25, 0.5, 1, 2, then 1.5 and 1.25."""
    ran = []

    def fake_run(target, opts, out, tag, *, users=0, rate=0.0):
        ran.append(rate)
        ratio = 1.0 if rate <= 1.3 else 0.5
        return {"rate": rate, "summary": {"goodput": {"ratio": ratio},
                                          "requests": {"server_errors_5xx": 0}}}

    monkeypatch.setattr(bench, "run_load", fake_run)
    opts = bench.Options(profile="ramp", ramp_start=0.25, ramp_factor=2, refine=2)
    stages, capacity = bench.ramp(bench.Target("t", "http://x"), opts, tmp_path, lambda _msg: None)
    assert ran == [0.25, 0.5, 1.0, 2.0, 1.5, 1.25]
    assert capacity == 1.25 and len(stages) == 6


@pytest.mark.parametrize("flags, message", [
    (["--profile", "ramp", "--rate", "1"], "sets its own rates"),
    (["--users", "2", "--rate", "1"], "not both"),
    (["--ramp-factor", "1"], "--ramp-factor 1.0 is out of range"),
    (["--url", "127.0.0.1:8000"], "give a base URL"),
    (["--url", "http://a:1", "--served-model", "x", "--served-model", "y", "--served-model", "z"],
     "one per --url"),
    (["--label", "a", "--label", "b"], "2 --label for 1 targets"),
    (["--quant", "int4,"], "comma-separated"),
    (["--slo", "no-such-slo"], "neither a file nor a preset"),
])
def test_bench_serve_usage_errors_exit_2_before_anything_starts(flags, message, capsys, tmp_path):
    from server.cli import main

    assert main(["bench", "serve", "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
