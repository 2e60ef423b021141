"""loadtests/locustfile.py drives a live nibble server headless: every request streams, counts
its tokens and records TTFT and inter-token latency; the client's counts agree with the
server's /metrics."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.live import LiveServer, variant

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 8
USERS = 2


@pytest.fixture(scope="module")
def live(llm_factory):
    server = LiveServer([variant(llm_factory("int4", batch_invariant=True), "int4")])
    yield server
    server.stop()


def _locust(url: str, out: Path, *extra: str) -> dict[tuple[str, str], dict]:
    cmd = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
           "-u", str(USERS), "-r", str(USERS), "-t", "6s", "--stop-timeout", "60", "--host", url,
           "--csv", str(out), "--only-summary", "--nibble-max-tokens", str(MAX_TOKENS), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    with open(f"{out}_stats.csv") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}, proc


def test_headless_run_records_ttft_itl_and_tokens(live, tmp_path):
    generated = live.metric("nibble_generation_tokens_total")
    rows, proc = _locust(live.url, tmp_path / "run", "--nibble-api", "mixed", "--nibble-prompts", "mixed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    posts = {k: r for k, r in rows.items() if k[0] == "POST"}
    assert set(posts) == {("POST", "POST /v1/chat/completions"), ("POST", "POST /v1/completions")}
    requests = sum(int(r["Request Count"]) for r in posts.values())
    assert requests >= 2 and all(int(r["Failure Count"]) == 0 for r in rows.values())
    for path in ("/v1/chat/completions", "/v1/completions"):
        post, ttft, itl = posts["POST", f"POST {path}"], rows["TTFT", path], rows["ITL", path]
        assert int(ttft["Request Count"]) == int(post["Request Count"])
        assert float(ttft["Median Response Time"]) > 0 and float(itl["Average Response Time"]) > 0
        assert float(post["Average Content Size"]) == MAX_TOKENS  # tokens per request
        # the first token and each gap after it come within the whole request's time
        whole = float(post["Average Response Time"])
        assert float(ttft["Average Response Time"]) < whole and float(itl["Average Response Time"]) < whole
    # the client's count of tokens is the server's, up to the one request per user that the
    # end of the run may cut after the server generated it
    server = live.metric("nibble_generation_tokens_total") - generated
    assert 0 <= server - requests * MAX_TOKENS <= USERS * MAX_TOKENS


def test_refusals_are_failures_named_by_status(live, tmp_path):
    """The server's 404 for an unknown model counts as a failure, with no TTFT recorded."""
    rows, _ = _locust(live.url, tmp_path / "bad", "--nibble-model", "no-such-model")
    assert int(rows["POST", "POST /v1/chat/completions"]["Failure Count"]) > 0
    assert ("TTFT", "/v1/chat/completions") not in rows
