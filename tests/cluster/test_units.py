"""The ingress's relay and the prefix router on their own (no Ray cluster): a fake
deployment handle and fake replicas drive RayEngine and PrefixAffinityRouter."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install -e '.[cluster]'")

from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve._private.common import (  # noqa: E402
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest  # noqa: E402

from engine.sequence import CompletionOutput, RequestOutput  # noqa: E402
from server.cluster.ingress import RETRIES, RayEngine  # noqa: E402
from server.cluster.replica import VariantInfo  # noqa: E402
from server.cluster.router import PrefixAffinityRouter, block_hashes  # noqa: E402
from server.protocol import APIError  # noqa: E402

DEPLOYMENT = DeploymentID(name="NibbleReplica", app_name="test")


def _out(n: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [], [CompletionOutput(0, "x" * n, list(range(n)),
                                                          "length" if finished else None)],
                         finished)


class _Call:
    """One streaming call: yields `items`; an exception among them is raised there."""

    def __init__(self, items, gate: asyncio.Event | None = None):
        self.items, self.gate, self.cancelled = list(items), gate, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for item in self.items:
            if self.gate is not None:
                await self.gate.wait()
            if isinstance(item, BaseException) and not isinstance(item, APIError):
                raise item
            yield item

    def cancel(self):
        self.cancelled = True


class _Handle:
    """Answers each generate call with the next of `calls`."""

    def __init__(self, calls):
        self.calls, self.made = list(calls), []
        self.generate = self

    def options(self, **kw):
        return self

    def remote(self, **kw):
        call = self.calls.pop(0)
        self.made.append(call)
        return call


def _engine(calls, max_queued: int = 4):
    variant = VariantInfo("m:int4", "m", "int4", None, 2, 0, {}, None)
    engine = RayEngine(_Handle(calls), [variant], max_queued, "test")
    engine.start()
    return engine, variant


async def _drain(sink: asyncio.Queue, engine) -> list:
    for _ in range(200):
        if not engine.in_flight():
            break
        await asyncio.sleep(0.005)
    items = []
    while not sink.empty():
        items.append(sink.get_nowait()[1])
    return items


def test_a_replica_that_dies_before_producing_is_retried_elsewhere():
    async def run():
        engine, v = _engine([_Call([ActorDiedError()]), _Call([_out(1), _out(2, True)])])
        sink: asyncio.Queue = asyncio.Queue()
        engine.submit(v, [1, 2, 3], None, sink)
        items = await _drain(sink, engine)
        assert [type(i).__name__ for i in items] == ["RequestOutput", "RequestOutput"]
        assert items[-1].finished and len(engine.handle.made) == 2
    asyncio.run(run())


def test_a_replica_that_dies_mid_request_ends_it_with_a_503():
    async def run():
        engine, v = _engine([_Call([_out(1), ActorDiedError()])])
        sink: asyncio.Queue = asyncio.Queue()
        engine.submit(v, [1], None, sink)
        items = await _drain(sink, engine)
        assert isinstance(items[0], RequestOutput)
        assert isinstance(items[1], APIError) and items[1].status == 503
        assert items[1].code == "replica_died" and len(engine.handle.made) == 1
    asyncio.run(run())


def test_a_full_replica_is_retried_and_the_last_refusal_passed_on():
    async def run():
        full = APIError(429, "full", code="queue_full")
        engine, v = _engine([_Call([full]), _Call([_out(1, True)])])
        sink: asyncio.Queue = asyncio.Queue()
        engine.submit(v, [1], None, sink)
        assert [type(i).__name__ for i in await _drain(sink, engine)] == ["RequestOutput"]
        assert engine.handle.made[0].cancelled
        engine, v = _engine([_Call([full]) for _ in range(RETRIES)])
        engine.submit(v, [1], None, sink)
        items = await _drain(sink, engine)
        assert len(items) == 1 and items[0].status == 429  # every replica was full
    asyncio.run(run())


def test_abort_frees_capacity_even_before_the_relay_ran():
    async def run():
        gate = asyncio.Event()
        engine, v = _engine([_Call([_out(1, True)], gate) for _ in range(8)], max_queued=0)
        sink: asyncio.Queue = asyncio.Queue()
        streams = [engine.submit(v, [1], None, sink) for _ in range(2)]  # 2 running, no queue
        with pytest.raises(APIError) as full:
            engine.submit(v, [1], None, sink)
        assert full.value.status == 429
        for s in streams:
            engine.abort(s)  # their relay tasks have not run a step yet
        assert engine.in_flight() == 0 and engine._idle.is_set()
        engine.submit(v, [1], None, sink)
        gate.set()
        items = await _drain(sink, engine)
        assert [i.finished for i in items] == [True]
        assert not any(c.cancelled for c in engine.handle.made)  # finished: nothing to cancel
    asyncio.run(run())


# ---------------------------------------------------------------------------- the router

class _Replica:
    def __init__(self, name: str):
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)


def _request(i: int, ids: list[int] | None, variant: str = "m:int4") -> PendingRequest:
    kwargs = {"prompt_ids": ids, "variant": variant} if ids is not None else {}
    return PendingRequest(args=[], kwargs=kwargs,
                          metadata=RequestMetadata(request_id=str(i), internal_request_id=f"i{i}"))


def _router(imbalance: int = 2) -> PrefixAffinityRouter:
    r = PrefixAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(block_size=4, imbalance=imbalance)
    return r


def test_block_hashes_name_whole_prefixes():
    a, b = list(range(10)), list(range(8)) + [99, 98]
    assert block_hashes(a, 4) == block_hashes(b, 4)  # 2 whole blocks each; the rest is partial
    assert block_hashes(a, 4)[0] == block_hashes([0, 1, 2, 3, 7, 7, 7, 7], 4)[0]
    assert block_hashes(a, 4)[1] != block_hashes([0, 1, 2, 3, 7, 7, 7, 7], 4)[1]
    assert block_hashes(a, 4, "m:int4") != block_hashes(a, 4, "m:bf16")


def test_router_follows_the_prefix_until_that_replica_is_much_busier():
    async def run():
        r, reps = _router(imbalance=2), [_Replica("a"), _Replica("b")]
        prefix = list(range(16))
        chosen = []
        for i in range(6):  # a burst: nothing completes in between
            ranks = await r.choose_replicas(reps, _request(i, prefix + [100 + i]))
            chosen.append(ranks[0][0].replica_id.unique_id)
        first = chosen[0]
        # the holder takes requests until it is 2 ahead, then the other one gets one, and
        # having been sent the prefix too, both hold it: the less busy of them wins
        assert chosen[:3] == [first] * 3 and set(chosen) == {"a", "b"}
        counts = {n: chosen.count(n) for n in "ab"}
        assert abs(counts["a"] - counts["b"]) <= 2, chosen
        # another variant's prompt with the same ids shares nothing
        r2 = _router()
        await r2.choose_replicas(reps, _request(0, prefix, "m:int4"))
        assert all(r2._match(x.replica_id, block_hashes(prefix, 4, "m:bf16")) == 0 for x in reps)
    asyncio.run(run())


def test_router_load_count_follows_completions_and_cancellations():
    async def run():
        r, reps = _router(), [_Replica("a"), _Replica("b")]
        done = _request(1, list(range(8)))
        ranks = await r.choose_replicas(reps, done)
        rid = ranks[0][0].replica_id
        r.on_request_routed(done, rid, None)
        assert r._loads() == {rid: 1}
        r.on_request_completed(rid, "i1")
        assert r._loads() == {}
        # a request that completes before Ray reports it routed is not counted again
        fast = _request(2, list(range(8)))
        await r.choose_replicas(reps, fast)
        r.on_request_completed(rid, "i2")
        r.on_request_routed(fast, rid, None)
        assert r._loads() == {}
        # one cancelled while being routed stops counting
        gone = _request(3, list(range(8)))
        await r.choose_replicas(reps, gone)
        assert sum(r._loads().values()) == 1
        gone.future.cancel()
        await asyncio.sleep(0)
        assert r._loads() == {}
        # a pinned request goes where it is pinned and counts nowhere
        pin = PendingRequest(args=[], kwargs={"replica": "b"},
                             metadata=RequestMetadata(request_id="4", internal_request_id="i4"))
        assert [[x.replica_id.unique_id for x in rank] for rank in
                await r.choose_replicas(reps, pin)] == [["b"]]
        assert r._loads() == {}
    asyncio.run(run())
