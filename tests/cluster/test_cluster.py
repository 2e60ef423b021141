"""Two replicas on a Ray cluster of two (simulated) nodes, joined with --ray-address: the
OpenAI API through the Ray ingress, /metrics per replica, prefix-affinity routing, and a
replica killed mid-stream."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cluster.conftest import AUTH, KEY, ray_server, wait_for

MODEL = "smollm2-135m:int4"


@pytest.fixture(scope="module")
def cluster(default_source):
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    with ray_server(tmp_path_factory, "ray2", ["--ray", "--ray-address", cluster.address,
                                               "--replicas", "2", "--shadow", "bf16",
                                               "--shadow-rate", "0.5"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def _prompt(seed: int, words: int) -> str:
    """A text of about `words` tokens that shares no leading block with another seed's."""
    return f"Record {seed}: " + " ".join(f"item{(seed * 7919 + i) % 10007}" for i in range(words))


def test_two_replicas_on_two_nodes(server, cluster):
    import ray

    assert len(server.replicas()) == 2
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    # each node offers one CPU and each replica asks for one: one replica per node
    assert ray.available_resources().get("CPU", 0) == 0


def test_openai_client_chat_stream_and_errors(server, client):
    import openai

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                          temperature=0)
    assert "Paris" in chat.choices[0].message.content
    assert chat.model == MODEL and chat.usage.completion_tokens > 0
    streamed = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                              temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content  # greedy: the same tokens either way
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="wrong").completions.create(model=MODEL, prompt="Hi",
                                                                max_tokens=2)
    assert server.http.get("/health").status_code == 200  # open: probes send no key
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_shadow_scores_and_compare_run_in_the_replicas(server):
    """Each replica holds the bf16 reference next to int4 and scores what it served; POST
    /v1/compare runs on one replica, its errors answered as on one process."""
    def scored():
        return sum(server.by_replica("nibble_shadow_tokens_total").values())

    for i in range(12):  # half of the completions are sampled
        r = server.post("/v1/completions", {"prompt": f"Shadow {i}: the sea", "max_tokens": 8})
        assert r.status_code == 200
        if scored():
            break
    wait_for(scored, 120, "the shadow reference to score a completion")
    r = server.post("/v1/compare", {"ctx": 64, "chunks": 2, "max_tokens": 4})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["a"]["label"] == "smollm2-135m:bf16" and report["b"]["label"] == MODEL
    assert report["teacher_forced"]["kld"]["mean"] > 0
    r = server.post("/v1/compare", {"a": "smollm2-135m:nf4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "a"


def test_a_client_that_goes_away_frees_its_replica(server):
    aborted0 = sum(server.by_replica("nibble_requests_finished_total", finish_reason="abort").values())
    events = _stream_events(server, {"prompt": "Tell me a long story", "max_tokens": 3000,
                                     "ignore_eos": True})
    next(events)
    events.close()  # the connection closes: the ingress cancels the replica's call
    wait_for(lambda: sum(server.by_replica("nibble_requests_finished_total",
                                           finish_reason="abort").values()) == aborted0 + 1,
             30, "the replica to abort the request")
    wait_for(lambda: sum(server.by_replica("nibble_requests_running").values()) == 0, 30,
             "the engine to drop it from its batch")


def test_metrics_carry_every_replica(server):
    before = server.by_replica("nibble_generation_tokens_total")
    assert set(before) == server.replicas() and len(before) == 2
    r = server.post("/v1/completions", {"prompt": "Count: one two", "max_tokens": 7,
                                        "ignore_eos": True})
    assert r.status_code == 200, r.text
    after = server.by_replica("nibble_generation_tokens_total")
    grew = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert list(grew.values()) == [r.json()["usage"]["completion_tokens"]]  # one replica, exact
    text = server.http.get("/metrics").text
    assert 'nibble_http_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert text.count("# TYPE nibble_generation_tokens_total counter") == 1


def test_shared_prefix_goes_to_the_replica_that_holds_it(server):
    prefix = _prompt(1, 100)
    done0 = server.by_replica("nibble_requests_finished_total")
    hits0 = server.by_replica("nibble_prefix_cache_hit_tokens_total")
    for i in range(6):  # one at a time: both replicas idle at each choice
        r = server.post("/v1/completions", {"prompt": f"{prefix} Question {i}?", "max_tokens": 2})
        assert r.status_code == 200, r.text
    done = {k: v - done0.get(k, 0) for k, v in server.by_replica("nibble_requests_finished_total").items()}
    assert sorted(done.values()) == [0, 6], done  # Ray's default would split them ~3/3
    hits = sum(server.by_replica("nibble_prefix_cache_hit_tokens_total").values()) - sum(hits0.values())
    blocks = len(server.post("/tokenize", {"prompt": prefix}).json()["tokens"]) // 16
    assert hits >= 5 * (blocks - 1) * 16, hits  # the 5 later prompts reuse the first one's blocks

    # prompts that share nothing are spread over both replicas by load and chance
    done0 = server.by_replica("nibble_requests_finished_total")
    for i in range(16):
        r = server.post("/v1/completions", {"prompt": _prompt(100 + i, 20), "max_tokens": 1})
        assert r.status_code == 200, r.text
    done = {k: v - done0.get(k, 0) for k, v in server.by_replica("nibble_requests_finished_total").items()}
    assert all(n > 0 for n in done.values()) and len(done) == 2, done


def test_a_busy_replica_is_passed_over_despite_its_prefix(server):
    """12 concurrent requests with one prefix: the replica holding it takes them until it is
    more than 4 requests busier than the other, which then takes some (and, sent the prefix
    too, shares the rest by load). Without the escape all 12 would go to the holder."""
    prefix = _prompt(2, 60)
    server.post("/v1/completions", {"prompt": prefix, "max_tokens": 1})  # one replica caches it
    done0 = server.by_replica("nibble_requests_finished_total")

    def one(i):
        return server.post("/v1/completions", {"prompt": f"{prefix} Q{i}", "max_tokens": 32,
                                               "ignore_eos": True}).status_code

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(one, range(12))) == [200] * 12
    done = {k: v - done0.get(k, 0) for k, v in server.by_replica("nibble_requests_finished_total").items()}
    assert len(done) == 2 and min(done.values()) > 0 and sum(done.values()) == 12, done


def _stream_events(server, body: dict):
    """Yields the data of each server-sent event of a streaming completion."""
    import http.client

    host, port = server.http.host, server.http.port
    conn = http.client.HTTPConnection(host, port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={**AUTH, "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    try:
        for line in resp:
            if line.startswith(b"data: "):
                yield line[6:].strip().decode()
    finally:
        conn.close()


def test_replica_killed_mid_stream(server):
    import ray

    prefix = _prompt(3, 60)
    events = _stream_events(server, {"prompt": f"{prefix} story", "max_tokens": 3000,
                                     "ignore_eos": True})
    assert json.loads(next(events))["choices"]
    # a non-streaming request on the same replica (the prefix takes it there), generating
    plain: dict = {}

    def unary():
        r = server.post("/v1/completions", {"prompt": f"{prefix} essay", "max_tokens": 3000,
                                            "ignore_eos": True})
        plain.update(status=r.status_code, body=r.json())

    t = threading.Thread(target=unary)
    t.start()
    busy = wait_for(lambda: [k for k, v in server.by_replica("nibble_requests_running").items()
                             if v == 2], 60, "both requests running on one replica")
    victim = busy[0]
    time.sleep(1.0)  # the unary request has produced tokens (held by the ingress)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::nibble#NibbleReplica#{victim}", namespace="serve"),
             no_restart=True)

    # requests arriving right after the kill: their prefix points at the dead replica, and
    # each is retried on the live one
    def one(i):
        return server.post("/v1/completions", {"prompt": f"{prefix} again {i}",
                                               "max_tokens": 4}).status_code

    with ThreadPoolExecutor(4) as pool:
        after = [pool.submit(one, i) for i in range(12)]
        rest = list(events)
        assert rest[-1] == "[DONE]"
        err = json.loads(rest[-2])["error"]
        assert err["code"] == "replica_died" and "replica" in err["message"], err
        t.join(120)
        assert plain["status"] == 503 and plain["body"]["error"]["code"] == "replica_died", plain
        assert [f.result() for f in after] == [200] * 12
    # Ray Serve starts a replacement
    wait_for(lambda: len(server.replicas() - {victim}) == 2, 240, "a replacement replica", 1.0)
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                             "max_tokens": 4})
    assert r.status_code == 200
