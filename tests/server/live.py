"""A real nibble server on a loopback port (in a thread with its own event loop) around LLMs
the test session already loaded, with plain-HTTP and /metrics helpers."""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass

from server.app import ServerSettings, ServerThread
from server.async_engine import Variant

MODEL = "smollm2-135m"


def variant(llm, quant: str) -> Variant:
    return Variant(f"{MODEL}:{quant}", MODEL, quant, llm)


class LiveServer(ServerThread):
    def __init__(self, variants: list[Variant], shadow: Variant | None = None, **settings):
        super().__init__(variants, ServerSettings(port=0, **settings), shadow)
        self.http = Http("127.0.0.1", self.port)

    @property
    def engine(self):
        return self.server.state.engine

    def metric(self, name: str, **labels) -> float:
        """One sample of /metrics (summed over label sets that match `labels`)."""
        values = [v for _, v in samples(self.http.get("/metrics").text, name, **labels)]
        assert values, f"{name} {labels} not in /metrics"
        return sum(values)


def samples(text: str, name: str, **labels):
    """(labels, value) of each line of /metrics text for `name` whose labels match `labels`."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            yield have, float(m.group(2))


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self):
        return json.loads(self.text)


class Http:
    """Plain HTTP/1.1 calls (one connection per call), for what the openai client cannot
    send: malformed bodies, raw headers, the non-/v1 endpoints."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def request(self, method: str, path: str, content: str | bytes | None = None,
                json_body=None, headers: dict | None = None, timeout: float = 120) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = dict(headers or {})
        if json_body is not None:
            content = json.dumps(json_body)
            headers.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=content.encode() if isinstance(content, str) else content,
                         headers=headers)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                         resp.read().decode("utf-8", "replace"))
        finally:
            conn.close()

    def get(self, path: str, headers: dict | None = None) -> Reply:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, json=None, content=None, headers: dict | None = None) -> Reply:
        return self.request("POST", path, content=content, json_body=json, headers=headers)
