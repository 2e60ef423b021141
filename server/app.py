"""Builds the aiohttp app; loads the variants, starts the engine thread, drains on SIGTERM.

Life of a server: it listens at once and answers /health with 503 "loading" while the
variants load on the engine thread (the one thread that runs PyTorch, see
server.async_engine.TorchThread); then "ok". SIGTERM (or SIGINT) turns /health to 503
"draining", new generation requests get 503, in-flight ones may finish until the shutdown
timeout, the rest are aborted, and the process exits 0. If the engine thread dies, /health
says "dead" and every waiting request ends with an error.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from engine.config import EngineConfig
from server.async_engine import AsyncEngine, Requests, TorchThread, Variant
from server.metrics import Metrics
from server.protocol import APIError
from server.responses import TokenText
from server.routes import Routes

log = logging.getLogger("nibble.server")
OPEN_PATHS = ("/health", "/metrics")  # never behind --api-key: probes and scrapers


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queued: int = 64  # per variant, beyond its running batch; more get 429
    # seconds from arrival to the first token, else 429 before any byte is sent; None: no limit
    queue_timeout: float | None = None
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 8 * 2**20
    shadow_rate: float = 0.1  # fraction of finished completions the shadow reference scores
    quality_gate: tuple = field(default=())  # engine.eval.gate.Condition, checked before serving
    quality_gate_tokens: int = 1024  # tokens the gate scores (chunks of up to 256, half scored)
    shadow_seed: int = 0


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = Metrics()
        self.phase = "loading"  # loading | ready | draining | dead
        self.variants: list[Variant] = []
        self.engine: Requests | None = None
        self.shadow = None  # server.quality.Shadow
        self.created = int(time.time())
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nibble-tokenize")
        self.torch = TorchThread()  # loads the variants, then runs the engine
        self._token_text: dict[str, TokenText] = {}

    def start(self, variants: list[Variant], shadow: Variant | None = None) -> None:
        """On the event loop, once the variants are loaded; `shadow` is the reference that
        scores a sample of what they serve (it may be one of them)."""
        from server.quality import Shadow

        # the engine thread steps the shadow too (POST /v1/compare generates with it), but
        # only the served variants are listed and routed
        stepped = variants + [shadow] if shadow is not None and all(shadow is not v for v in variants) \
            else variants
        engine = AsyncEngine(stepped, self.settings.max_queued, self.metrics, self.torch)
        self.metrics.watch(engine)
        if shadow is not None:
            self.shadow = Shadow(engine, shadow, self.settings.shadow_rate, self.metrics,
                                 self.settings.shadow_seed)
        self.attach(engine, variants)

    def attach(self, engine, variants: list) -> None:
        """Serves `variants` through `engine` from now on: this process's AsyncEngine, or the
        Ray replicas' (server.cluster.ingress.RayEngine), which the routes use the same way."""
        self.variants = variants
        self.engine = engine
        engine.start()
        self.phase = "ready"

    async def render_metrics(self) -> bytes:
        """/metrics: this process's registry, and every replica's series under a `replica`
        label when the engine has replicas."""
        return self.metrics.render(await self.engine.scrape() if self.engine is not None else None)

    def variant(self, name: str | None) -> Variant:
        if not self.variants:
            raise APIError(503, "the server is still loading its models; retry when /health "
                           "says ok", code="loading")
        if name is None or name == "":
            return self.variants[0]
        for v in self.variants:
            if name == v.name:
                return v
        if name == self.variants[0].model:
            return self.variants[0]
        known = ", ".join(v.name for v in self.variants)
        raise APIError(404, f"the model {name!r} does not exist; this server has {known} "
                       f"(the bare name {self.variants[0].model!r} means the first)",
                       param="model", code="model_not_found")

    def token_text(self, v: Variant) -> TokenText:
        if v.name not in self._token_text:
            self._token_text[v.name] = TokenText(v.tokenizer)
        return self._token_text[v.name]

    async def compare(self, req) -> dict:
        """POST /v1/compare: run where the engine runs (here, or on one replica)."""
        return await self.engine.compare(self, req)

    @property
    def healthy_phase(self) -> str:
        if self.engine is not None and self.engine.dead is not None:
            self.phase = "dead"
        return self.phase


def build_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=state.settings.max_body_bytes,
                          middlewares=[_errors(state), _auth(state)])
    Routes(state).add_to(app)
    return app


def _errors(state: ServerState):
    @web.middleware
    async def middleware(request: web.Request, handler):
        state.healthy_phase  # noqa: B018 - notices a dead engine before answering
        try:
            resp = await handler(request)
        except APIError as exc:
            resp = _error_response(exc)
        except web.HTTPRequestEntityTooLarge as exc:
            resp = _error_response(APIError(413, f"the request body is larger than "
                                            f"{state.settings.max_body_bytes} bytes",
                                            code="body_too_large"))
            del exc
        except web.HTTPException as exc:  # no such route, wrong method
            if exc.status < 400:
                raise
            resp = _error_response(APIError(exc.status, f"{request.method} {request.path}: "
                                            f"{exc.reason}", code=None))
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("unhandled error in %s %s", request.method, request.path)
            resp = _error_response(APIError(500, f"internal error: {exc!r}", code="internal_error"))
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        state.metrics.http_status(endpoint, resp.status)
        return resp

    return middleware


def _auth(state: ServerState):
    key = state.settings.api_key

    @web.middleware
    async def middleware(request: web.Request, handler):
        if key is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            token = given[7:] if given.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        return await handler(request)

    return middleware


def _error_response(exc: APIError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return web.json_response(exc.body(), status=exc.status, headers=headers)


class Server:
    """A running server: `await start()`, then `await stop()` (drains first)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.state = ServerState(settings)
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Starts listening (variants still loading: /health 503)."""
        self.runner = web.AppRunner(build_app(self.state), handler_cancellation=True,
                                    access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port)
        await site.start()

    @property
    def port(self) -> int:
        return self.runner.addresses[0][1]

    def ready(self, variants: list[Variant], shadow: Variant | None = None) -> None:
        self.state.start(variants, shadow)

    async def stop(self, timeout: float | None = None) -> int:
        """/health turns 503, new requests get 503, in-flight ones get up to `timeout`
        seconds; returns how many were aborted."""
        st = self.state
        aborted = 0
        if st.phase != "dead":
            st.phase = "draining"
        if st.engine is not None:
            aborted = await st.engine.drain(self.settings.shutdown_timeout if timeout is None else timeout)
            await asyncio.get_running_loop().run_in_executor(None, st.engine.stop)
        if self.runner is not None:
            await self.runner.cleanup()
        st.pool.shutdown(wait=False, cancel_futures=True)
        st.torch.shutdown()
        return aborted


def load_variants(model_name: str, configs: list[tuple[str | None, EngineConfig]]) -> list[Variant]:
    """Loads each (quantization string, config) in order and names it model:quantization (no
    string: what the checkpoint or the rules hold, or "custom")."""
    return [_load(model_name, label, cfg) for label, cfg in configs]


def _load(model_name: str, label: str | None, cfg: EngineConfig) -> Variant:
    from engine.llm import LLM

    llm = LLM(config=cfg)
    policy = llm.loaded.policy
    label = label or (policy.describe() if not policy.rules else "custom")
    # a MODEL:QUANT label (a shadow reference) names its own model
    model = label.rpartition(":")[0] if ":" in label else model_name
    name = f"{model}:{label.rpartition(':')[2]}"
    log.info("loaded %s (%s)", name, policy.describe())
    return Variant(name, model, policy.describe(), llm)


def prepare(model_name: str, configs: list[tuple[str | None, EngineConfig]],
            shadow: tuple[str, EngineConfig] | None, gate: tuple,
            gate_tokens: int = 1024) -> tuple[list[Variant], Variant | None]:
    """Loads the served variants and the shadow reference (reusing a served variant with the
    same config), then checks the quality gate (raises server.quality.GateFailed)."""
    from engine.eval import weights_key
    from engine.loader import reader_cache
    from engine.plan import check_fits
    from server.quality import run_gate

    with reader_cache():  # one model file, parsed once for all of them
        wanted = [cfg for _, cfg in configs]
        if shadow is not None and all(weights_key(c) != weights_key(shadow[1]) for c in wanted):
            wanted.append(shadow[1])
        check_fits(wanted)  # all of them together, before any weight is read
        variants = load_variants(model_name, configs)
        ref = None
        if shadow is not None:
            label, cfg = shadow
            ref = next((v for v in variants if weights_key(v.llm.config) == weights_key(cfg)),
                       None) or _load(model_name, label, cfg)
            log.info("shadow A/B: %s scores a sample of %s", ref.name,
                     ", ".join(v.name for v in variants if v is not ref))
    if gate:
        for line in run_gate(variants, list(gate), [ref] if ref is not None else [], gate_tokens):
            log.info("%s", line)
    return variants, ref


async def serve(settings: ServerSettings, model_name: str, configs: list[tuple[str, EngineConfig]],
                shadow: tuple[str, EngineConfig] | None = None) -> int:
    """The `nibble serve` process: listen, load (and pass the quality gate), serve until
    SIGTERM/SIGINT, drain, exit. Returns the exit status (3: the quality gate failed)."""
    from server.quality import GateFailed

    def load(server: Server):
        log.info("listening on http://%s:%d; loading %d variant(s) of %s", settings.host,
                 server.port, len(configs), model_name)
        return asyncio.wrap_future(server.state.torch.submit(
            prepare, model_name, configs, shadow, settings.quality_gate,
            settings.quality_gate_tokens))

    def ready(server: Server, loaded) -> int | None:
        try:
            variants, reference = loaded.result()
        except GateFailed as exc:
            return gate_failed(exc)
        server.ready(variants, reference)
        log.info("ready: %s on http://%s:%d/v1", ", ".join(v.name for v in variants),
                 settings.host, server.port)
        return None

    return await run_server(settings, load, ready)


def gate_failed(report) -> int:
    """Says why the quality gate stopped the server; the exit status."""
    from server.quality import GATE_EXIT

    log.error("%s\nnot serving: the variant does not meet --quality-gate", report)
    return GATE_EXIT


async def run_server(settings: ServerSettings, load: Callable[[Server], asyncio.Future],
                     ready: Callable[[Server, asyncio.Future], int | None]) -> int:
    """A server process's life: listen at once, `load(server)` (a future) while /health says
    "loading", then `ready(server, that future)`: it attaches the engine and returns None, or
    an exit status not to serve with; serve until SIGTERM/SIGINT, drain, exit 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(settings)
    await server.start()
    loading = load(server)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, waiter], return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        log.info("stopped while loading")
        await server.stop(0)
        return 0
    try:
        status = ready(server, loading)
    except Exception:
        waiter.cancel()
        await server.stop(0)
        raise
    if status is not None:
        waiter.cancel()
        await server.stop(0)
        return status
    await waiter
    log.info("draining: up to %.0f s for %d in-flight requests", settings.shutdown_timeout,
             server.state.engine.in_flight())
    aborted = await server.stop()
    log.info("stopped%s", f" ({aborted} requests aborted)" if aborted else "")
    return 0


class ServerThread:
    """A server on its own event loop in a background thread (for embedding the server in a
    program, for benchmarks and tests).

    `variants`: a function that loads them, run on the server's engine thread (full speed,
    see server.async_engine.TorchThread), or variants this process already loaded (the
    engine then steps them from a thread of its own: slower wherever the loading thread kept
    its OpenMP workers)."""

    def __init__(self, variants: list[Variant] | Callable[[], list[Variant]],
                 settings: ServerSettings | None = None, shadow: Variant | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nibble-server",
                                       daemon=True)
        self.thread.start()
        self.server = Server(settings or ServerSettings(port=0))
        if callable(variants):
            variants = self.server.state.torch.run(variants)
        self.call(self.server.start())
        self.call(self._ready(variants, shadow))
        self.port = self.server.port
        self.url = f"http://{self.server.settings.host}:{self.port}"

    async def _ready(self, variants: list[Variant], shadow: Variant | None) -> None:
        self.server.ready(variants, shadow)

    def call(self, coro, timeout: float = 120):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_engine_thread(self, fn: Callable[[], object], timeout: float | None = None):
        """fn() on the engine thread once no request is in flight (it may run LLM.generate
        on the served variants); its result."""
        async def idle():
            return await self.server.state.engine.run_idle(fn)

        return self.call(idle(), timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Drains for up to `timeout` seconds, then stops the loop and its thread."""
        self.call(self.server.stop(timeout))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
