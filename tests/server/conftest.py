"""One live server per test module, on the default model in int4; every path through it is
batch-invariant so a request's tokens do not depend on what else runs."""

from __future__ import annotations

import pytest

from tests.server.live import LiveServer, variant

MAX_QUEUED = 4


@pytest.fixture(scope="module")
def llm(llm_factory):
    return llm_factory("int4", batch_invariant=True)


@pytest.fixture(scope="module")
def live(llm):
    server = LiveServer([variant(llm, "int4")], max_queued=MAX_QUEUED)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    from openai import OpenAI

    with OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c
