"""`nibble serve` as a process (loading, SIGTERM drain, argument errors), variants side by
side, and how fast an abort reaches the engine."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.server.cli_helpers import assert_clean_error, nibble
from tests.server.live import Http, LiveServer, variant

pytestmark = pytest.mark.slow


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`nibble ARGS` in this process (what a subprocess would print, without its start-up)."""
    from server.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_serve_help_explains_the_server(capsys):
    code, out, _ = _cli(capsys, "serve", "--help")
    assert code == 0
    for fragment in ("/v1/chat/completions", "--variants", "--max-queued", "429",
                     "--shutdown-timeout", "SIGTERM", "except /health", "/metrics"):
        assert fragment in " ".join(out.split()), fragment
    assert "serve" in _cli(capsys, "--help")[1]


@pytest.mark.parametrize("args,fragments", [
    (["--variants", "int4,int4"], ["distinct"]),
    (["--variants", "bf16,int5"], ["unknown quantization 'int5'"]),
    (["--port", "70000"], ["--port 70000"]),
    (["--max-queued", "-1"], ["--max-queued"]),
    (["-m", "no-such-model"], ["no-such-model"]),
])
def test_serve_mistakes_fail_before_loading(capsys, args, fragments):
    code, _, err = _cli(capsys, "serve", *args)
    assert code == 2 and err.startswith("nibble: error:") and "Traceback" not in err
    for f in fragments:
        assert f in err, err


def test_variants_from_a_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('variants = "int4"\n')
    assert_clean_error(nibble("serve", "-c", str(bad), timeout=60), "list of quantization")
    from server.cli import build_parser, engine_config

    good = tmp_path / "good.toml"
    good.write_text('variants = ["bf16", "int8"]\nmax_num_seqs = 4\n')
    args = build_parser().parse_args(["serve", "-c", str(good)])
    cfg = engine_config(args)
    assert args.variants == "bf16,int8" and cfg.max_num_seqs == 4
    args = build_parser().parse_args(["serve", "-c", "serve-ab-bf16-int4"])  # the preset
    assert engine_config(args).model == "smollm2-135m" and args.variants == "bf16,int4"
    args = build_parser().parse_args(["serve", "-c", "serve-ab-bf16-int4", "--variants", "int8"])
    engine_config(args)
    assert args.variants == "int8"  # the flag wins
    assert engine_config(build_parser().parse_args(["serve"])).decode_activations == "int8"
    fp32 = build_parser().parse_args(["serve", "--decode-activations", "fp32"])
    assert engine_config(fp32).decode_activations == "fp32"


@pytest.mark.parametrize("command", ["serve", "compare", "generate"])
def test_retune_flag_makes_the_kernels_measure_again(monkeypatch, command):
    from kernels import tuning_cache
    from server.cli import apply_environment, build_parser

    monkeypatch.delenv("NIBBLE_RETUNE", raising=False)
    apply_environment(build_parser().parse_args([command]))
    assert not tuning_cache.retune()
    apply_environment(build_parser().parse_args([command, "--retune"]))
    assert tuning_cache.retune()


class Process:
    """`nibble serve` in a subprocess; its stderr lines are collected as they come."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", "0",
                                      *args], stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_line(self, pattern: str, timeout: float = 120) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"serve exited: {''.join(self.log)}"
                continue
            self.log.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}: {''.join(self.log)}")


def test_sigterm_drains_in_flight_requests_then_exits_0():
    p = Process("-q", "int4", "--max-model-len", "512", "--shutdown-timeout", "60")
    try:
        port = int(p.wait_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        http = Http("127.0.0.1", port)
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = http.post("/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        assert http.get("/v1/models/smollm2-135m").status_code == 503
        assert http.get("/v1/models").json()["data"] == []
        p.wait_line(r"ready: smollm2-135m:int4")
        assert http.get("/health").status_code == 200

        # 96 tokens: seconds of decoding on any CPU, so the request is still in flight when the
        # signal comes (the signal goes once the engine runs it, not after a guessed sleep)
        body = {"prompt": "Once upon a time", "max_tokens": 96, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        reply: dict = {}
        t = threading.Thread(target=lambda: reply.update(r=http.post("/v1/completions", json=body)))
        t.start()
        running = re.compile(r"^nibble_requests_running\{[^}]*\} 1\.0$", re.M)
        deadline = time.monotonic() + 60
        while not running.search(http.get("/metrics").text):
            assert time.monotonic() < deadline, "the request never started running"
            time.sleep(0.02)
        p.proc.send_signal(signal.SIGTERM)
        p.wait_line(r"draining")
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 503
        t.join(120)
        events = [e[6:] for e in reply["r"].text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 96
        assert p.proc.wait(60) == 0
    finally:
        if p.proc.poll() is None:
            p.proc.kill()


def test_variants_side_by_side(llm_factory):
    bf16, int4 = llm_factory("bf16"), llm_factory("int4", batch_invariant=True)
    server = LiveServer([variant(bf16, "bf16"), variant(int4, "int4")])
    try:
        models = server.http.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["smollm2-135m:bf16", "smollm2-135m:int4"]
        by = {m["quantization"]: m["weight_bytes"] for m in models}
        assert by["bf16"] > 1.4 * by["int4"]
        body = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0,
                "ignore_eos": True}
        for name, served in (("smollm2-135m", "smollm2-135m:bf16"),
                             ("smollm2-135m:bf16", "smollm2-135m:bf16"),
                             ("smollm2-135m:int4", "smollm2-135m:int4")):
            r = server.http.post("/v1/completions", json={**body, "model": name})
            assert r.status_code == 200 and r.json()["model"] == served
        assert server.metric("nibble_generation_tokens_total", model="smollm2-135m:bf16",
                             quantization="bf16") == 10
        assert server.metric("nibble_generation_tokens_total", model="smollm2-135m:int4",
                             quantization="int4") == 5
        assert server.metric("nibble_time_to_first_token_seconds_count",
                             model="smollm2-135m:int4") == 1
    finally:
        server.stop()


def test_an_abort_reaches_the_engine_before_its_next_step(live, llm, monkeypatch):
    """The request a client gave up on is in at most the one step that had already begun."""
    steps: list[tuple[float, set[str]]] = []
    aborts: dict[str, float] = {}
    real_step, real_abort = llm.engine.step, live.engine.abort

    def step():
        steps.append((time.perf_counter(), set(llm.engine.request_ids())))
        return real_step()

    def abort(stream):
        aborts.setdefault(stream.request_id, time.perf_counter())
        real_abort(stream)

    monkeypatch.setattr(llm.engine, "step", step)
    monkeypatch.setattr(live.engine, "abort", abort)
    from tests.server.test_faults import _open_stream, _slam

    for i in range(5):
        _slam(_open_stream(live, {"prompt": "Go on and on", "max_tokens": 500, "ignore_eos": True,
                                  "seed": i, "temperature": 1.0}))
    end = time.monotonic() + 30
    while live.engine.in_flight() or llm.engine.has_unfinished():
        assert time.monotonic() < end
        time.sleep(0.05)
    assert len(aborts) == 5
    for rid, t in aborts.items():
        late = [s for s in steps if s[0] > t and rid in s[1]]
        assert len(late) <= 1, f"{rid} stayed {len(late)} steps after its abort"


def test_the_engine_steps_on_the_thread_that_loaded(llm_factory):
    """Loading and stepping share one thread: the only thread whose OpenMP workers PyTorch
    keeps (a second one halves decode speed on a 2-core machine, see TorchThread)."""
    loaded_on, stepped_on = [], set()

    def load():
        loaded_on.append(threading.get_ident())
        llm = llm_factory("int4", batch_invariant=True)
        real = llm.engine.step

        def step():
            stepped_on.add(threading.get_ident())
            return real()

        llm.engine.step = step
        return [variant(llm, "int4")]

    server = LiveServer(load)
    try:
        r = server.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200
        assert stepped_on == set(loaded_on) and loaded_on[0] != threading.get_ident()
        assert server.on_engine_thread(threading.get_ident) == loaded_on[0]
    finally:
        server.stop()
        del server.server.state.variants[0].llm.engine.step
