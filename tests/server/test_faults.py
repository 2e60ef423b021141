"""Faults and load: clients that vanish mid-stream, overload, many concurrent streams, an
engine that dies."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import MAX_QUEUED
from tests.server.live import LiveServer, variant

pytestmark = pytest.mark.slow

LABELS = {"model": "smollm2-135m:int4"}


def _open_stream(live, body: dict, wait: bool = True) -> socket.socket:
    """Sends a streaming request on a raw socket and returns once the first event arrived
    (wait) or at once (a request that will queue sends nothing until it runs)."""
    payload = json.dumps({**body, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", live.server.port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    seen = b""
    while wait and b"data: " not in seen:
        chunk = s.recv(65536)
        assert chunk, f"the server closed the stream early: {seen!r}"
        seen += chunk
    assert not wait or b" 200 OK" in seen.split(b"\r\n", 1)[0], seen
    return s


def _slam(s: socket.socket) -> None:
    """Closes with a reset, as a killed client does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def _wait_for(cond, timeout: float = 30.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_200_abrupt_disconnects_free_everything(live):
    free0 = live.metric("nibble_kv_blocks_free", **LABELS)
    gen0 = live.metric("nibble_generation_tokens_total", **LABELS)
    abort0 = live.metric("nibble_requests_finished_total", finish_reason="abort", **LABELS)
    body = {"prompt": "Tell me a long story about a dragon", "max_tokens": 400, "ignore_eos": True}

    def one(i: int) -> None:
        _slam(_open_stream(live, {**body, "seed": i, "temperature": 0.8}))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(200)))

    def settled() -> bool:
        return (live.metric("nibble_requests_running", **LABELS) == 0
                and live.metric("nibble_requests_waiting", **LABELS) == 0
                and live.metric("nibble_kv_blocks_free", **LABELS) == free0)

    _wait_for(settled, what="running 0 and the free KV blocks back at their start count")
    assert live.engine.in_flight() == 0
    assert live.metric("nibble_requests_finished_total", finish_reason="abort", **LABELS) - abort0 == 200
    # aborted in the engine, not run to max_tokens: 200 x 400 tokens would be 80000
    assert live.metric("nibble_generation_tokens_total", **LABELS) - gen0 < 200 * 20
    r = live.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200


def test_overload_is_answered_429_at_once(live, llm, monkeypatch):
    """A request over capacity is refused before any work is done for it: the prompt is not
    even tokenized (checked by counting, not timing, so a busy machine cannot fail it)."""
    from server import routes

    encoded = []
    real_encode = routes._encode_prompts
    monkeypatch.setattr(routes, "_encode_prompts", lambda *a: encoded.append(1) or real_encode(*a))
    running = llm.config.max_num_seqs
    capacity = running + MAX_QUEUED
    body = {"prompt": "Count slowly:", "max_tokens": 1000, "ignore_eos": True}
    held = []
    try:
        with ThreadPoolExecutor(8) as pool:
            held = list(pool.map(lambda i: _open_stream(live, {**body, "seed": i}), range(running)))
        held += [_open_stream(live, body, wait=False) for _ in range(MAX_QUEUED)]
        _wait_for(lambda: live.engine.in_flight() == capacity, what="the queue to fill")
        _wait_for(lambda: live.metric("nibble_requests_waiting", **LABELS) == MAX_QUEUED,
                  what="the engine to queue the overflow")
        encoded.clear()
        replies = [live.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                   for _ in range(20)]
        assert all(r.status_code == 429 for r in replies), [r.status_code for r in replies]
        assert replies[0].headers["retry-after"] == "1"
        assert replies[0].json()["error"]["code"] == "queue_full"
        # decided before any work, while the engine steps 16 sequences
        assert not encoded
        assert live.engine.in_flight() == capacity  # the refused ones never entered
    finally:
        for s in held:
            _slam(s)
    _wait_for(lambda: live.engine.in_flight() == 0, what="the held requests to be aborted")
    assert live.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_queue_timeout_refuses_what_cannot_start_in_time(llm):
    """With --queue-timeout, a request whose first token cannot come in time gets 429 (code
    queue_timeout) instead of a late stream: the full batch here never frees a slot."""
    timeout = 2.0
    live = LiveServer([variant(llm, "int4")], queue_timeout=timeout)
    body = {"prompt": "Count slowly:", "max_tokens": 1000, "ignore_eos": True}
    held = []
    try:
        with ThreadPoolExecutor(8) as pool:
            held = list(pool.map(lambda i: _open_stream(live, {**body, "seed": i}),
                                 range(llm.config.max_num_seqs)))
        for stream in (False, True):
            t = time.perf_counter()
            r = live.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2,
                                                        "stream": stream})
            waited = time.perf_counter() - t
            assert r.status_code == 429, r.text  # a status, not a stream with an error event
            assert r.json()["error"]["code"] == "queue_timeout" and r.headers["retry-after"] == "1"
            assert waited >= timeout
        # the refused requests left the engine: only the held ones are in flight
        _wait_for(lambda: live.engine.in_flight() == len(held), what="the refused to be aborted")
    finally:
        for s in held:
            _slam(s)
        _wait_for(lambda: live.engine.in_flight() == 0, what="the held requests to be aborted")
        live.stop()


def test_16_concurrent_streams_get_complete_correct_answers(client):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(16)]
    kw = dict(model="smollm2-135m", max_tokens=20, temperature=0)
    alone = [client.completions.create(prompt=p, **kw).choices[0] for p in prompts]
    start = threading.Barrier(16)

    def stream(p: str):
        start.wait()
        text, reasons = "", []
        for chunk in client.completions.create(prompt=p, stream=True, **kw):
            for c in chunk.choices:
                text += c.text
                if c.finish_reason:
                    reasons.append(c.finish_reason)
        return text, reasons

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(stream, prompts))
    for (text, reasons), want in zip(got, alone, strict=True):
        assert text == want.text
        assert reasons == [want.finish_reason]


def test_a_dead_engine_turns_health_503_and_fails_requests(llm, monkeypatch):
    server = LiveServer([variant(llm, "int4")])
    calls = {"n": 0}
    real_step = llm.engine.step

    def failing_step():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("injected fault")
        return real_step()

    try:
        assert server.http.get("/health").status_code == 200
        monkeypatch.setattr(llm.engine, "step", failing_step)
        body = {"prompt": "Hello", "max_tokens": 50, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            streamed = pool.submit(server.http.post, "/v1/completions", json={**body, "stream": True})
            whole = pool.submit(server.http.post, "/v1/completions", json=body)
            streamed, whole = streamed.result(60), whole.result(60)
        assert whole.status_code == 500 and whole.json()["error"]["code"] == "engine_dead"
        events = [e for e in streamed.text.split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == "engine_dead"
        health = server.http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        r = server.http.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "dead"
    finally:
        monkeypatch.undo()
        server.stop()
    assert not llm.engine.has_unfinished()  # the dead requests gave their blocks back


def test_drain_timeout_ends_unfinished_streams_with_an_error(llm):
    server = LiveServer([variant(llm, "int4")])
    body = {"prompt": "Keep talking", "max_tokens": 1000, "ignore_eos": True}
    try:
        s = _open_stream(live=server, body=body)
        whole = ThreadPoolExecutor(1).submit(server.http.post, "/v1/completions", json=body)
        _wait_for(lambda: server.engine.in_flight() == 2, what="both requests in flight")
    finally:
        aborted = server.call(server.server.stop(0.5))
        server.loop.call_soon_threadsafe(server.loop.stop)
    assert aborted == 2
    s.settimeout(30)
    rest = b""
    while not rest.endswith(b"0\r\n\r\n"):  # the chunked body's end
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    s.close()
    events = re.findall(r"data: (.*?)\n\n", rest.decode())
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    r = whole.result(30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert not llm.engine.has_unfinished()
