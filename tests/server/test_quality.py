"""Quality in the server: shadow A/B metrics move with served traffic and never run beside a live
request; POST /v1/compare; the startup quality gate refuses a variant with corrupted scales and
passes a sound one."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from safetensors.torch import load_file, save_file

from engine.eval import parse_gate
from server.cli import main
from tests.server.live import Http, LiveServer, variant

pytestmark = pytest.mark.slow
INT4, BF16 = "smollm2-135m:int4", "smollm2-135m:bf16"
PAIR = {"served": INT4, "reference": BF16}


@pytest.fixture(scope="module")
def calls():
    return []


@pytest.fixture(scope="module")
def live(llm_factory, calls):
    """int4 served, bf16 as shadow reference scoring every finished completion; every score()
    call records whether any engine had a live request at that moment."""
    served, ref = llm_factory("int4", batch_invariant=True), llm_factory("bf16")
    server = None

    def spy(llm):
        def score(ids):
            busy = any(v.engine.has_unfinished() for v in server.engine.variants.values())
            calls.append((llm is ref, busy))
            return type(llm).score(llm, ids)
        return score

    for llm in (served, ref):
        llm.score = spy(llm)
    try:
        server = LiveServer([variant(served, "int4")], shadow=variant(ref, "bf16"), shadow_rate=1.0)
        yield server
        server.stop()
    finally:
        for llm in (served, ref):
            del llm.score


def _wait_for(live, name: str, value: float, timeout: float = 120, **labels) -> float:
    deadline = time.monotonic() + timeout
    while (got := live.metric(name, **labels)) < value and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_shadow_metrics_move_with_served_requests(live, calls):
    before = live.metric("nibble_shadow_tokens_total", **PAIR)
    replies = [live.http.post("/v1/completions", json={
        "prompt": p, "max_tokens": 8, "ignore_eos": True, "temperature": 0})
        for p in ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    assert all(r.status_code == 200 for r in replies)
    served = sum(r.json()["usage"]["completion_tokens"] for r in replies)
    assert served == 24
    assert _wait_for(live, "nibble_shadow_tokens_total", before + served, **PAIR) == before + served
    assert live.metric("nibble_shadow_kld_count", **PAIR) == before + served
    kld_sum = live.metric("nibble_shadow_kld_sum", **PAIR)
    agree = live.metric("nibble_shadow_top1_agreement_total", **PAIR)
    assert kld_sum > 0 and 0 < agree <= before + served
    assert live.metric("nibble_shadow_requests_total", outcome="scored", **PAIR) >= 3
    # every shadow pass ran while no live request was in any engine: it took no step from one
    assert calls and not any(busy for _, busy in calls)
    assert {is_ref for is_ref, _ in calls} == {True, False}


def test_shadow_backlog_full_drops_and_counts(live):
    shadow = live.server.state.shadow
    dropped = live.metric("nibble_shadow_requests_total", outcome="dropped", **PAIR)
    shadow.backlog = 0
    try:
        assert live.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        assert _wait_for(live, "nibble_shadow_requests_total", dropped + 1, 10,
                         outcome="dropped", **PAIR) == dropped + 1
    finally:
        shadow.backlog = 64


def test_compare_endpoint(live):
    body = {"chunks": 2, "ctx": 64, "prompts": ["Say hi.", "Count to five."], "max_tokens": 6}
    r = live.http.post("/v1/compare", json=body)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["schema"] == "nibble.compare/1"
    assert report["a"]["label"] == BF16 and report["b"]["label"] == INT4  # shadow vs served
    t = report["teacher_forced"]
    assert t["scored_tokens"] == 64 and t["kld"]["mean"] > 0
    assert report["free_running"]["prompts"] == 2 and report["free_running"]["max_tokens"] == 6
    assert report["cost"]["weight_ratio_b_over_a"] < 1
    same = live.http.post("/v1/compare", json={**body, "a": INT4, "b": INT4}).json()
    assert same["teacher_forced"]["kld"]["max"] == 0
    assert same["free_running"]["exact_match_rate"] == 1.0


@pytest.mark.parametrize("body, status, param", [
    ({"a": "smollm2-135m:nf4"}, 404, "a"),
    ({"chunks": 1}, 400, "chunks"),
    ({"ctx": 8}, 400, "ctx"),
    ({"ctx": 4096}, 400, "ctx"),
    ({"prompts": []}, 400, "prompts"),
    ({"prompts": ["ok", 3]}, 400, "prompts"),
    ({"text": "far too short", "free_running": False}, 400, "text"),
    ({"max_tokens": 0}, 400, "max_tokens"),
])
def test_compare_endpoint_bad_input(live, body, status, param):
    r = live.http.post("/v1/compare", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


# ---------------------------------------------------------------- quality gate

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A sound int4-g32 checkpoint and a copy whose scales were tripled."""
    root = tmp_path_factory.mktemp("gate")
    sound, broken = root / "sound", root / "broken"
    assert main(["quantize", "-q", "int4-g32", "--out", str(sound)]) == 0
    broken.mkdir()
    for f in sound.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(sound / "model.safetensors"))
    corrupted = {k: v * 3 if k.endswith(".scales") else v for k, v in tensors.items()}
    assert sum(k.endswith(".scales") for k in tensors) > 0
    save_file(corrupted, str(broken / "model.safetensors"), metadata={"format": "pt"})
    return sound, broken


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gate_refuses_corrupted_scales(checkpoints, caplog):
    caplog.set_level("INFO", logger="nibble")
    code = main(["serve", "--model", str(checkpoints[1]), "--port", "0",
                 "--quality-gate", "kld<0.05", "--quality-gate-tokens", "64", "--kv-cache-memory", "3e8"])
    assert code == 3
    text = caplog.text
    assert "quality gate" in text and "FAIL" in text and "kld<0.05" in text
    assert "not serving" in text


def test_gate_passes_a_sound_variant_and_serves(checkpoints, caplog):
    caplog.set_level("INFO", logger="nibble")
    port = _free_port()
    http = Http("127.0.0.1", port)
    seen = {}

    def stop_when_healthy():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if http.get("/health").status_code == 200:
                    seen["completion"] = http.post("/v1/completions", json={
                        "prompt": "Hello", "max_tokens": 2}).status_code
                    break
            except OSError:
                pass
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_healthy, daemon=True).start()
    code = main(["serve", "--model", str(checkpoints[0]), "--port", str(port),
                 "--quality-gate", "kld<0.05,top1>0.9", "--quality-gate-tokens", "64", "--kv-cache-memory", "3e8"])
    assert code == 0
    assert seen.get("completion") == 200
    assert "-> pass" in caplog.text


def test_gate_expression_mistakes_exit_2(capsys):
    assert main(["serve", "--quality-gate", "kld<<1"]) == 2
    assert "metrics: kld" in capsys.readouterr().err
    assert parse_gate("kld<0.05")[0].limit == 0.05
