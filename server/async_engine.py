"""The bridge between asyncio and the engine thread.

One thread owns every variant's engine and is the only thread of the server that runs PyTorch
(see TorchThread): it loads the variants, then takes commands (add, abort) from a thread-safe
queue, steps each engine that has work, and hands each step's outputs to the event loop in one
`call_soon_threadsafe`. The loop side keeps one `Stream` per engine request and puts its
outputs into the asyncio.Queue the request handler reads. Nothing on the loop side touches an
engine, and only this one thread runs forward passes (the CPU kernels' scratch buffers assume
one forward pass at a time).

Background work (shadow scoring, /v1/compare) goes to the same thread as idle tasks: a task
runs only when no engine has a request to step and no command is waiting, one task at a time,
so a live request waits at most for the one task already running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.llm import LLM
from engine.llm_engine import EngineStats
from engine.report import kernel_report, total_bytes
from engine.sampling_params import SamplingParams
from engine.sequence import RequestOutput
from server.protocol import APIError, Limits

log = logging.getLogger("nibble.server")


@dataclass
class Variant:
    """One loaded variant of the served model: `smollm2-135m:int4`."""

    name: str
    model: str  # the bare model name
    quantization: str
    llm: LLM

    @property
    def engine(self):
        return self.llm.engine

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def limits(self) -> Limits:
        return Limits(self.llm.loaded.config.vocab_size, self.engine.context_limit)

    @functools.cached_property
    def weight_bytes(self) -> int:  # walks every module: once
        return total_bytes(self.llm.model)

    @functools.cached_property
    def kernels(self) -> dict:
        """Which kernels serve it (engine.report.kernel_report) and what the process's CPU
        dispatch chose at load (kernels.cpu.choices); fixed once every variant is loaded."""
        from kernels import cpu

        return {**kernel_report(self.llm.model), "cpu_dispatch": cpu.choices()}

    @property
    def max_running(self) -> int:
        return self.llm.config.max_num_seqs


class TorchThread:
    """The one thread of a server process that runs PyTorch: it loads the variants (and runs
    the quality gate), then steps the engines for the server's life.

    Why one: PyTorch's CPU ops run on libgomp, and every thread that has run a parallel region
    keeps a pool of OpenMP workers until it exits. Once a process holds more such workers
    than it has cores, libgomp cuts every pool's spin-wait to a few hundred iterations, so
    between two ops the workers sleep and each of the ~400 ops of a decode step pays a futex
    wake-up. Loading in one thread and stepping in another did exactly that: measured on a
    2-core AMD EPYC (AVX2), int4, the engine stepped from a second thread decoded 21 tok/s
    where the same thread that loaded decoded 35. In-process `LLM.generate` in the main
    thread never had the problem: it loads and steps in one thread.
    """

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nibble-engine")

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        return self._pool.submit(fn, *args)

    def run(self, fn: Callable, *args):
        """fn(*args) on the thread; its result, or its exception raised here."""
        return self.submit(fn, *args).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an exception; nothing more will be generated."""


@dataclass(eq=False)
class Stream:
    """One engine request as the loop sees it."""

    request_id: str
    variant: Variant
    sink: asyncio.Queue  # (tag, RequestOutput | Exception)
    tag: int
    prompt_ids: list[int]
    start: float = field(default_factory=time.perf_counter)
    last: dict[int, float] = field(default_factory=dict)  # completion index -> last token time
    tokens: dict[int, int] = field(default_factory=dict)  # completion index -> tokens seen


class Requests:
    """What the routes see of an engine, whichever runs the requests: the in-flight streams,
    admission (429 past each replica's batch plus --max-queued, 503 when stopped or
    draining) and draining. AsyncEngine runs them in this process; server.cluster's
    RayEngine in Ray Serve replicas."""

    def __init__(self, variants: list, max_queued: int):
        self.variants = {v.name: v for v in variants}
        self.max_queued = max_queued
        self.dead: BaseException | None = None
        self.accepting = True
        # called on the loop with (stream, output) for every finished request (shadow A/B)
        self.on_finished: Callable[[Stream, RequestOutput], None] | None = None
        self._streams: dict[str, Stream] = {}
        self._ids = itertools.count()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def replica_count(self) -> int:
        """Engines that serve each variant (their capacities add up)."""
        return 1

    def in_flight(self, variant: Variant | None = None) -> int:
        return sum(1 for s in self._streams.values() if variant is None or s.variant is variant)

    def check_capacity(self, variant: Variant, count: int) -> None:
        """Raises 429 when `count` more requests would overflow the variant's queue, and 503
        when nothing is accepted at all."""
        if self.dead is not None:
            raise APIError(503, f"the engine has stopped ({self.dead!r}); the server cannot "
                           "generate any more", code="engine_dead")
        if not self.accepting:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        n = self.replica_count()
        if self.in_flight(variant) + count > n * (variant.max_running + self.max_queued):
            each = f" on each of {n} replicas" if n > 1 else ""
            raise APIError(429, f"{variant.name} is at capacity ({variant.max_running} running, "
                           f"{self.max_queued} queued{each}); retry shortly", code="queue_full")

    def _new_stream(self, variant, prompt_ids: list[int], sink: asyncio.Queue, tag: int,
                    arrival: float | None) -> Stream:
        self.check_capacity(variant, 1)
        stream = Stream(f"r{next(self._ids)}", variant, sink, tag, list(prompt_ids))
        if arrival is not None:
            stream.start = arrival
        self._streams[stream.request_id] = stream
        self._idle.clear()
        return stream

    def start(self) -> None:
        """On the event loop, before the first request."""
        self._loop = asyncio.get_running_loop()

    def stop(self) -> None:
        """After draining; may block (the server calls it in a thread)."""

    def abort(self, stream: Stream) -> None:
        raise NotImplementedError

    async def scrape(self) -> dict[str, str] | None:
        """Other processes' /metrics text by replica id, for the server's /metrics to merge;
        None where every engine is in this process."""
        return None

    async def compare(self, state, req) -> dict:
        """A POST /v1/compare job (server.quality.compare_job) where the variants are."""
        from server.quality import compare_job

        return await compare_job(state, req)

    async def drain(self, timeout: float) -> int:
        """Stops accepting, waits up to `timeout` s for in-flight requests, aborts the rest;
        returns how many were aborted."""
        self.accepting = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        left = list(self._streams.values())
        for s in left:
            s.sink.put_nowait((s.tag, APIError(503, "the server shut down before this request "
                                               "finished", code="shutting_down")))
            self.abort(s)
        return len(left)

    def _check_idle(self) -> None:
        if not self._streams:
            self._idle.set()


class AsyncEngine(Requests):
    def __init__(self, variants: list[Variant], max_queued: int, metrics=None,
                 thread: TorchThread | None = None):
        """thread: where the variants were loaded (a new one if None)."""
        super().__init__(variants, max_queued)
        self.thread = thread or TorchThread()
        self.metrics = metrics
        self._cmds: queue.Queue = queue.Queue()
        self._tasks: deque = deque()  # engine thread only: (fn, future) idle tasks
        self._stats: dict[str, EngineStats] = {v.name: v.engine.stats() for v in variants}
        self._running: concurrent.futures.Future | None = None

    # ------------------------------------------------------------ loop side

    def start(self) -> None:
        super().start()
        self._running = self.thread.submit(self._run)

    def stats(self, name: str) -> EngineStats:
        return self._stats[name]

    def submit(self, variant: Variant, prompt_ids: list[int], params: SamplingParams,
               sink: asyncio.Queue, tag: int = 0, prompt: str | None = None,
               arrival: float | None = None) -> Stream:
        """Queues one engine request; its outputs arrive in `sink` as (tag, output).
        `arrival` (perf_counter) starts its latency clocks; default now."""
        stream = self._new_stream(variant, prompt_ids, sink, tag, arrival)
        if self.metrics:
            self.metrics.prompt_tokens(variant, len(prompt_ids))
        self._cmds.put(("add", variant, stream.request_id, list(prompt_ids), params, prompt))
        return stream

    def abort(self, stream: Stream) -> None:
        """Ends a request the client no longer waits for; the engine drops it before its next
        step. A finished request is left alone."""
        if self._streams.pop(stream.request_id, None) is None:
            return
        if self.metrics:
            self.metrics.finished(stream.variant, "abort", time.perf_counter() - stream.start)
        self._cmds.put(("abort", stream.variant, stream.request_id))
        self._check_idle()

    def run_idle(self, fn: Callable[[], object]) -> asyncio.Future:
        """Runs fn() on the engine thread when no engine has work; its result (or exception)
        arrives in the returned future. fn may run forward passes (LLM.score)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead!r}")
        fut = self._loop.create_future()
        self._cmds.put(("task", fn, fut))
        return fut

    def stop(self) -> None:
        self._cmds.put(("stop",))
        if self._running is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                self._running.result(timeout=30)
        self.thread.shutdown()

    def _dispatch(self, variant: Variant, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            s = self._streams.get(out.request_id)
            if s is None:  # aborted while the step ran
                continue
            self._observe(s, out, now)
            s.sink.put_nowait((s.tag, out))
            if out.finished:
                del self._streams[out.request_id]
                if self.on_finished is not None:
                    self.on_finished(s, out)
        self._check_idle()

    def _observe(self, s: Stream, out: RequestOutput, now: float) -> None:
        m = self.metrics
        for c in out.outputs:
            n = len(c.token_ids)
            new = n - s.tokens.get(c.index, 0)
            if new <= 0:
                continue
            if m:
                m.generation_tokens(s.variant, new)
                if c.index not in s.last:
                    m.first_token(s.variant, now - s.start)
                else:
                    m.inter_token(s.variant, (now - s.last[c.index]) / new)
            s.tokens[c.index], s.last[c.index] = n, now
        if out.finished and m:
            for c in out.outputs:
                m.finished(s.variant, c.finish_reason or "abort", now - s.start)

    def _fail(self, request_id: str, exc: Exception) -> None:
        s = self._streams.pop(request_id, None)
        if s is not None:
            s.sink.put_nowait((s.tag, exc))
        self._check_idle()

    def _fail_all(self, exc: BaseException) -> None:
        err = EngineDeadError(f"the engine stopped: {exc!r}")
        for rid in list(self._streams):
            self._fail(rid, err)

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while True:
                busy = any(v.engine.has_unfinished() for v in self.variants.values())
                if not self._commands(block=not busy and not self._tasks):
                    return
                stepped = False
                for v in self.variants.values():
                    if v.engine.has_unfinished():
                        stepped = True
                        outputs = v.engine.step()
                        if outputs:
                            self._loop.call_soon_threadsafe(self._dispatch, v, outputs)
                    self._stats[v.name] = v.engine.stats()
                if not stepped and self._tasks and self._cmds.empty():
                    self._run_task(*self._tasks.popleft())
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting request
            log.exception("the engine thread died")
            self.dead = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)
            for _, fut in self._tasks:
                self._loop.call_soon_threadsafe(_settle, fut, None, EngineDeadError(repr(exc)))
            for v in self.variants.values():  # give back what the dead requests held
                with contextlib.suppress(Exception):
                    for rid in v.engine.request_ids():
                        v.engine.abort(rid)

    def _run_task(self, fn, fut: asyncio.Future) -> None:
        try:
            result, error = fn(), None
        except Exception as exc:  # noqa: BLE001 - goes back to whoever queued the task
            result, error = None, exc
        self._loop.call_soon_threadsafe(_settle, fut, result, error)

    def _commands(self, block: bool) -> bool:
        """Applies queued commands (waiting for one when idle); False on stop."""
        try:
            cmd = self._cmds.get(block=block)
        except queue.Empty:
            return True
        while True:
            if cmd[0] == "stop":
                return False
            if cmd[0] == "task":
                self._tasks.append(cmd[1:])
            elif cmd[0] == "add":
                _, v, rid, ids, params, prompt = cmd
                try:
                    v.engine.add_request(rid, ids, params, prompt=prompt)
                except Exception as exc:  # noqa: BLE001 - goes back to the one request
                    self._loop.call_soon_threadsafe(self._fail, rid, exc)
            else:
                _, v, rid = cmd
                v.engine.abort(rid)
            if cmd[0] != "task":
                self._stats[v.name] = v.engine.stats()
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return True


def _settle(fut: asyncio.Future, result, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
