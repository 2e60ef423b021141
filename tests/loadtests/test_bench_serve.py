"""`nibble bench serve` against a live nibble server on loopback: a short soak (closed-loop
users) reports real, non-zero numbers with zero errors, the client's tokens equal the server's,
and every KV block comes back; the overload profile (Poisson arrivals past what the server
admits) gets 429s and no 5xx, and the requests it accepted meet their SLO. Locust's own
statistics (the locustfile's entries) are checked on the same runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from server.cli import main
from tests.server.live import LiveServer, variant

pytestmark = pytest.mark.slow
MAX_TOKENS = 8


@pytest.fixture
def server(llm_factory, request):
    live = LiveServer([variant(llm_factory("int4", batch_invariant=True), "int4")],
                      **getattr(request, "param", {}))
    yield live
    live.stop()


def _bench(server, tmp_path, capsys, *flags: str) -> tuple[int, dict, str]:
    slo = tmp_path / "slo.toml"
    # loose limits: 2 shared cores run the server, locust and the test at once
    slo.write_text("ttft_p99_ms = 20000\nitl_p99_ms = 5000\ngoodput_ratio = 0.9\n")
    out = tmp_path / "report"
    code = main(["bench", "serve", "--url", server.url, "--label", "int4", "--slo", str(slo),
                 "--max-tokens", str(MAX_TOKENS), "--drain", "60", "--out", str(out), *flags])
    return code, json.loads((out / "report.json").read_text()), capsys.readouterr().out


def _locust_stats(tmp_path: Path, stage: dict) -> dict[tuple[str, str], dict]:
    name = stage["records_file"].removesuffix(".jsonl")
    with open(tmp_path / "report" / f"{name}_stats.csv") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


def test_soak_reports_real_numbers_and_returns_every_block(server, tmp_path, capsys):
    generated = server.metric("nibble_generation_tokens_total")
    code, doc, table = _bench(server, tmp_path, capsys, "--profile", "soak", "--users", "2",
                              "--duration", "4", "--api", "mixed")
    assert code == 0 and doc["schema"] == "nibble.bench-serve/1" and doc["pass"]
    (t,) = doc["targets"]
    s = t["summary"]
    assert s["requests"]["sent"] >= 2 and s["requests"]["ok"] == s["requests"]["sent"]
    assert s["requests"]["by_status"] == {"200": s["requests"]["sent"]}
    assert s["throughput"]["output_tokens"] == MAX_TOKENS * s["requests"]["ok"]
    assert s["throughput"]["output_tokens_per_s"] > 0 and s["throughput"]["requests_per_s"] > 0
    assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] < s["e2e_ms"]["p99"]
    assert 0 < s["itl_ms"]["p50"] <= s["itl_ms"]["p99"]
    # warm-up aside, the server generated exactly the tokens the client counted: the run
    # drains its last requests instead of cutting them
    warmup = 2 * MAX_TOKENS
    served = server.metric("nibble_generation_tokens_total") - generated - warmup
    assert t["cross_check"]["agree"] and t["cross_check"]["tokens"]["client"] == served
    assert t["soak"]["kv_blocks_not_returned"] == 0 and t["soak"]["kv_blocks_total"] > 0
    assert t["memory"]["peak_rss_mb"] > 100 and len(t["series"]["memory"]) >= 2
    assert sum(t["series"]["tokens_per_s"]) > 0
    assert "TTFT p50 / p99" in table and "PASS" in table
    png = tmp_path / "report" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "report" / t["stages"][0]["records_file"]).read_text().splitlines()
    assert len(lines) == s["requests"]["sent"]
    # the locustfile's entries: the whole request, TTFT and ITL per endpoint (mixed API)
    rows = _locust_stats(tmp_path, t["stages"][0])
    posts = {k: r for k, r in rows.items() if k[0] == "POST"}
    assert set(posts) == {("POST", "POST /v1/chat/completions"), ("POST", "POST /v1/completions")}
    assert sum(int(r["Request Count"]) for r in posts.values()) == s["requests"]["sent"]
    assert all(int(r["Failure Count"]) == 0 for r in rows.values())
    for path in ("/v1/chat/completions", "/v1/completions"):
        post, ttft, itl = posts["POST", f"POST {path}"], rows["TTFT", path], rows["ITL", path]
        assert int(ttft["Request Count"]) == int(post["Request Count"])
        assert float(post["Average Content Size"]) == MAX_TOKENS  # tokens per request
        # the first token and each gap after it come within the whole request's time
        whole = float(post["Average Response Time"])
        assert 0 < float(ttft["Average Response Time"]) < whole
        assert 0 < float(itl["Average Response Time"]) < whole


@pytest.mark.parametrize("server", [{"max_queued": 0}], indirect=True)
def test_overload_refuses_the_excess_with_429_and_no_5xx(server, tmp_path, capsys):
    """16 may run and none may wait: Poisson arrivals at 2 x 12 req/s for 4 s overflow it.
    32 tokens a request (the last --max-tokens wins) keep more than 16 in flight on a CPU
    several times faster than 2 shared cores too."""
    assert 'status="429"' not in server.http.get("/metrics").text  # a fresh server: none yet
    code, doc, table = _bench(server, tmp_path, capsys, "--profile", "overload", "--capacity",
                              "12", "--duration", "4", "--max-tokens", "32")
    (t,) = doc["targets"]
    req = t["summary"]["requests"]
    assert t["overload"]["rate"] == 24
    assert req["refused_429"] > 0 and req["server_errors_5xx"] == 0 and req["other_errors"] == 0
    assert req["ok"] > 0 and set(req["by_status"]) == {"200", "429"}
    assert server.metric("nibble_http_requests_total", status="429") == req["refused_429"]
    # what was accepted met the SLO, so the run passes
    assert t["checks"]["no_5xx"] and t["summary"]["slo"]["pass"] and code == 0
    assert max(t["series"]["refused_per_s"]) > 0
    # in locust's statistics the 429s are failures named by the status, with no TTFT recorded
    rows = _locust_stats(tmp_path, t["stages"][0])
    post = rows["POST", "POST /v1/chat/completions"]
    assert int(post["Failure Count"]) == req["refused_429"]
    assert int(rows["TTFT", "/v1/chat/completions"]["Request Count"]) == req["ok"]
    with open(tmp_path / "report" / f"{t['stages'][0]['records_file'][:-6]}_failures.csv") as f:
        assert {r["Error"] for r in csv.DictReader(f)} == {"CatchResponseError('429')"}
