"""--autoscale on a local Ray cluster that `nibble serve --ray` starts itself (no address):
load scales it from 1 replica to 2, and back to 1 once the load is gone, without losing a
request (a replica scaled down finishes what it runs first)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cluster.conftest import ray_server, wait_for

CONFIG = """
[ray]
autoscale = "1:2"
target_ongoing = 1
[ray.autoscaling]
upscale_delay_s = 1
downscale_delay_s = 4
look_back_period_s = 2
metrics_interval_s = 0.5
"""


@pytest.fixture(scope="module")
def server(default_source, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("autoscale") / "ray.toml"
    cfg.write_text(CONFIG)
    with ray_server(tmp_path_factory, "autoscale", ["--config", str(cfg)]) as s:
        yield s


def test_scales_up_under_load_and_back_down(server):
    assert len(server.replicas()) == 1
    tokens = 96
    body = {"prompt": "Write about rivers.", "max_tokens": tokens, "ignore_eos": True}
    results: list[tuple[int, int]] = []  # (status, completion tokens) of every request
    stop = threading.Event()

    def one(i):
        r = server.post("/v1/completions", {**body, "seed": i, "temperature": 0.7})
        return r.status_code, r.json().get("usage", {}).get("completion_tokens")

    def keep_busy(i):  # 3 streams at a time until told to stop: 3 ongoing > target 1
        while not stop.is_set():
            results.append(one(i))

    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(keep_busy, i) for i in range(3)]
        wait_for(lambda: len(server.replicas()) == 2, 180, "a second replica", 1.0)
        served = wait_for(lambda: len([v for v in server.by_replica(
            "nibble_requests_finished_total").values() if v > 0]) == 2, 120,
            "both replicas serving", 1.0)
        assert served
        stop.set()
        for f in busy:
            f.result()
    # one request at a time (1 ongoing = target): Ray Serve removes a replica; any request
    # it still runs finishes first
    trickle = threading.Event()

    def sequential():
        while not trickle.is_set():
            results.append(one(99))

    t = threading.Thread(target=sequential)
    t.start()
    try:
        wait_for(lambda: len(server.replicas()) == 1, 180, "the scale-down to 1 replica", 1.0)
    finally:
        trickle.set()
        t.join(120)
    assert results and all(res == (200, tokens) for res in results), results
    r = server.post("/v1/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens
