"""`nibble serve --ray` as users start it (a subprocess), on Ray clusters of this machine.
Run by `make test-cluster` (needs `pip install -e '.[cluster]'`), not by `make test`."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install -e '.[cluster]'")

from loadtests.bench import nibble_server  # noqa: E402
from tests.server.live import Http, samples  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "cluster-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


class RayServer:
    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log
        host, port = url.removeprefix("http://").split(":")
        self.http = Http(host, int(port))

    def by_replica(self, name: str, **labels) -> dict[str, float]:
        """One /metrics sample per replica (summed over the label sets matching `labels`)."""
        out: dict[str, float] = defaultdict(float)
        for have, value in samples(self.http.get("/metrics").text, name, **labels):
            if "replica" in have:
                out[have["replica"]] += value
        return dict(out)

    def replicas(self) -> set[str]:
        return set(self.by_replica("nibble_kv_blocks_total"))

    def post(self, path: str, body: dict, **kw):
        return self.http.post(path, json=body, headers=AUTH, **kw)


def wait_for(cond, timeout: float, what: str, every: float = 0.25):
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < end, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


@contextlib.contextmanager
def ray_server(tmp_path_factory, label: str, args: list[str]):
    log = tmp_path_factory.mktemp(label) / "server.log"
    with nibble_server(label, ["--quant", "int4", "--threads", "1", "--api-key", KEY, *args],
                       log, timeout=600) as target:
        yield RayServer(target.url, log)
