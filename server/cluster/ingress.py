"""The `nibble serve --ray` process: the HTTP layer, with its engine in Ray Serve replicas.

`serve()` listens at once (/health 503 "loading"), starts a local Ray cluster or joins one,
deploys the replicas (server.cluster.replica) with the router (server.cluster.router), reads
the variants from a replica, and then serves exactly as server.app.serve does, with a
`RayEngine` where a one-process server has its AsyncEngine. SIGTERM drains the ingress, then
deletes the application (Ray Serve lets each replica's in-flight requests finish) and, if it
started the Ray cluster, stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from server.app import Server, ServerSettings, gate_failed, run_server
from server.async_engine import Requests, Stream
from server.cluster import live
from server.cluster.replica import NibbleReplica, ReplicaSpec, VariantInfo
from server.protocol import APIError

log = logging.getLogger("nibble.server")
ROUTERS = {"prefix": "server.cluster.router.PrefixAffinityRouter",
           "pow2": "server.cluster.router.RayDefaultRouter"}
RETRIES = 3  # attempts for a request whose replica died before it produced anything
SCRAPE_TIMEOUT = 5.0  # seconds a replica may take to hand over its /metrics


@dataclass(frozen=True)
class ClusterSettings:
    """`nibble serve --ray` and the config file's [ray] table."""

    address: str | None = None  # None: start a local cluster; "auto": this machine's
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    target_ongoing: float | None = None  # autoscaling target per replica (None: max_num_seqs)
    autoscaling: dict = field(default_factory=dict)  # more of Ray Serve's autoscaling_config
    cpus: float = 1.0  # per replica
    gpus: float = 0.0  # per replica
    router: str = "prefix"  # prefix | pow2
    imbalance: int = 4  # prefix router: a cached replica this much busier is passed over
    app: str = "nibble"  # the Ray Serve application: one per server sharing a cluster

    def deployment_options(self, settings: ServerSettings, configs) -> dict:
        """Ray Serve's options for the replicas of `configs` (the served variants' engine
        configs, which share one KV block size)."""
        from ray.serve.config import RequestRouterConfig

        kwargs = {"block_size": configs[0].block_size, "imbalance": self.imbalance} \
            if self.router == "prefix" else {}
        max_running = sum(c.max_num_seqs for c in configs)
        opts = {
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
            # what a replica admits (each variant's batch and queue), plus room for scrapes;
            # a replica that is full for one variant answers 429 and the ingress tries another
            "max_ongoing_requests": max_running + len(configs) * settings.max_queued + 4,
            "graceful_shutdown_timeout_s": settings.shutdown_timeout,
            "graceful_shutdown_wait_loop_s": 1.0,
            "health_check_period_s": 5.0,
            "request_router_config": RequestRouterConfig(
                request_router_class=ROUTERS[self.router], request_router_kwargs=kwargs),
        }
        if self.autoscale is None:
            opts["num_replicas"] = self.replicas
        else:
            low, high = self.autoscale
            opts["autoscaling_config"] = {
                "min_replicas": low, "max_replicas": high, "initial_replicas": low,
                "target_ongoing_requests": self.target_ongoing or max_running,
                **self.autoscaling}
        return opts


def cluster_settings(table: dict | None, flags: dict, device: str, threads: int | None,
                     cores: int) -> ClusterSettings:
    """The [ray] table of a config file with the command line's flags on top. `threads`: the
    engine's (--threads) per replica, which is what a replica asks Ray for in CPUs; on CUDA a
    replica asks for one GPU."""
    from engine.errors import ConfigError

    if table is not None and not isinstance(table, dict):
        raise ConfigError("the config's 'ray' key must be a table: [ray] with replicas, "
                          "autoscale, address, ...")
    data = dict(table or {})
    valid = ("address", "replicas", "autoscale", "target_ongoing", "autoscaling", "router",
             "imbalance", "app")
    for key in data:
        if key not in valid:
            raise ConfigError(f"unknown key {key!r} in the config's [ray] table; valid: "
                              f"{', '.join(valid)}")
    given = {k: v for k, v in flags.items() if v is not None}
    if given.get("replicas") is not None and given.get("autoscale") is not None:
        raise ConfigError("give --replicas or --autoscale, not both")
    if "replicas" in given:  # a flag replaces the file's way of counting replicas
        data.pop("autoscale", None)
    if "autoscale" in given:
        data.pop("replicas", None)
    data.update(given)
    if data.get("replicas") is not None and data.get("autoscale") is not None:
        raise ConfigError("the [ray] table gives both replicas and autoscale; keep one")
    autoscale = data.pop("autoscale", None)
    if autoscale is not None:
        parts = autoscale.split(":") if isinstance(autoscale, str) else list(autoscale)
        try:
            low, high = (int(p) for p in parts)
        except (TypeError, ValueError):
            raise ConfigError(f"autoscale {autoscale!r}: give MIN:MAX replicas, e.g. 1:4") from None
        if not 0 < low <= high:
            raise ConfigError(f"autoscale {autoscale!r}: need 1 <= MIN <= MAX")
        data["autoscale"] = (low, high)
    replicas = data.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ConfigError(f"replicas must be a positive integer, got {replicas!r}")
    target = data.get("target_ongoing")
    if target is not None and "autoscale" not in data:
        raise ConfigError("target_ongoing (--target-ongoing) is the autoscaler's: give "
                          "--autoscale MIN:MAX with it")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)
                               or target <= 0):
        raise ConfigError(f"target_ongoing must be a positive number, got {target!r}")
    if data.get("router", "prefix") not in ROUTERS:
        raise ConfigError(f"router must be one of {', '.join(ROUTERS)}, got {data['router']!r}")
    imbalance, app = data.get("imbalance", 4), data.get("app", "nibble")
    if isinstance(imbalance, bool) or not isinstance(imbalance, int) or imbalance < 0:
        raise ConfigError(f"imbalance must be a whole number of requests >= 0, got {imbalance!r}")
    if not isinstance(app, str) or not app:
        raise ConfigError(f"app must be a Ray Serve application name, got {app!r}")
    if not isinstance(data.get("autoscaling", {}), dict):
        raise ConfigError("[ray] autoscaling must be a table of Ray Serve autoscaling_config keys")
    most = data["autoscale"][1] if "autoscale" in data else replicas
    cpus = threads or max(1, cores // most)
    gpus = 1.0 if device.startswith("cuda") else 0.0
    return ClusterSettings(cpus=float(1 if gpus else cpus), gpus=gpus, **data)


class RayEngine(Requests):
    """The routes' engine (server.async_engine.Requests) over a Ray Serve deployment handle.

    Each request is one streaming call to a replica, relayed into the request's sink. A
    replica that dies before a request's first output is retried on another (nothing was
    generated for the client yet); one that dies later ends the request with a 503 error
    (the routes send it as an error event once streaming has begun)."""

    def __init__(self, handle, variants: list[VariantInfo], max_queued: int, app: str):
        super().__init__(variants, max_queued)
        self.handle = handle
        self.app = app
        self._relays: dict[str, asyncio.Task] = {}

    def replicas(self) -> tuple[str, ...]:
        return live.replicas(self.app)

    def replica_count(self) -> int:
        return max(1, len(self.replicas()))

    def submit(self, variant: VariantInfo, prompt_ids: list[int], params, sink: asyncio.Queue,
               tag: int = 0, prompt: str | None = None, arrival: float | None = None) -> Stream:
        stream = self._new_stream(variant, prompt_ids, sink, tag, arrival)
        self._relays[stream.request_id] = self._loop.create_task(self._relay(stream, params, prompt))
        return stream

    async def _relay(self, stream: Stream, params, prompt: str | None) -> None:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        produced = False
        try:
            for attempt in range(RETRIES):
                # the replica's clocks (TTFT, latency) start at the request's arrival here,
                # less the time Ray's router and transport take (clocks of two machines
                # cannot be compared; that time is not counted)
                responses = self.handle.options(stream=True).generate.remote(
                    variant=stream.variant.name, prompt_ids=stream.prompt_ids, params=params,
                    prompt=prompt, waited=time.perf_counter() - stream.start)
                try:
                    async for out in responses:
                        if not produced and _elsewhere(out) and attempt < RETRIES - 1:
                            break  # that replica cannot take it now: another one may
                        produced = True
                        stream.sink.put_nowait((stream.tag, out))
                        if isinstance(out, Exception) or out.finished:
                            self._forget(stream)  # nothing left to abort
                    else:
                        return
                    responses.cancel()
                    log.info("request %s: a replica refused it (%s); trying another",
                             stream.request_id, out.code)
                except asyncio.CancelledError:
                    responses.cancel()
                    raise
                except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                    if produced or attempt == RETRIES - 1:
                        stream.sink.put_nowait((stream.tag, APIError(
                            503, f"the replica serving this request stopped ({type(exc).__name__}) "
                            "before it finished; retry it", code="replica_died")))
                        return
                    log.warning("a replica died before request %s started; retrying it "
                                "(attempt %d)", stream.request_id, attempt + 2)
                await asyncio.sleep(0.1 * (attempt + 1))
        except Exception as exc:  # noqa: BLE001 - Ray's own failures: the request's 500
            stream.sink.put_nowait((stream.tag, exc))
        finally:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        self._streams.pop(stream.request_id, None)
        self._relays.pop(stream.request_id, None)
        self._check_idle()

    def abort(self, stream: Stream) -> None:
        """Cancels the replica call (Ray Serve cancels it in the replica, which aborts the
        engine request); a finished request is left alone."""
        relay = self._relays.get(stream.request_id)
        self._forget(stream)  # now: a relay cancelled before it ran has no `finally`
        if relay is not None and not relay.done():
            relay.cancel()

    async def scrape(self) -> dict[str, str]:
        """Every live replica's /metrics text, by replica id (a replica that does not answer
        within SCRAPE_TIMEOUT is left out of this scrape)."""
        async def one(replica: str):
            response = self.handle.metrics.remote(replica=replica)
            try:
                return await asyncio.wait_for(response, SCRAPE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - a replica going away mid-scrape
                response.cancel()
                log.debug("replica %s did not answer /metrics: %r", replica, exc)
                return None

        answers = await asyncio.gather(*(one(r) for r in self.replicas()))
        return dict(a for a in answers if a is not None)

    async def compare(self, state, req) -> dict:
        result = await self.handle.compare.remote(req)
        if isinstance(result, Exception):
            raise result
        return result


def _elsewhere(out) -> bool:
    """A replica's first answer that another replica may not give: it is full (its own
    --max-queued, which a skewed split can reach first) or its engine has stopped."""
    return isinstance(out, APIError) and out.code in ("queue_full", "engine_dead", "shutting_down")



# ---------------------------------------------------------------------------- the process

def connect(cluster: ClusterSettings) -> bool:
    """Joins the cluster at cluster.address, or starts a local one; True if started here."""
    import ray

    kwargs = {"include_dashboard": False, "log_to_driver": False}
    if cluster.address is None:
        ray.init(address="local", **kwargs)
        return True
    ray.init(address=cluster.address, **kwargs)
    return False


def deploy(cluster: ClusterSettings, spec: ReplicaSpec):
    """Deploys the replicas and waits for them; returns (handle, info of one replica)."""
    from ray import serve

    opts = cluster.deployment_options(spec.settings, [cfg for _, cfg in spec.configs])
    deployment = serve.deployment(NibbleReplica, name="NibbleReplica", **opts)
    serve.start(proxy_location="Disabled")
    handle = serve.run(deployment.bind(spec), name=cluster.app, route_prefix=None)
    info = handle.info.remote().result(timeout_s=600)
    return handle, info


def undeploy(cluster: ClusterSettings, started: bool) -> None:
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(cluster.app)  # each replica finishes its in-flight requests first
    if started:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


async def serve(settings: ServerSettings, cluster: ClusterSettings, spec: ReplicaSpec) -> int:
    """`nibble serve --ray`; returns the exit status (3: the quality gate failed)."""
    loop = asyncio.get_running_loop()
    started: list[bool] = []  # whether this process started the Ray cluster, once connected
    deploying: list[asyncio.Future] = []

    def connect_and_deploy():
        started.append(connect(cluster))
        return deploy(cluster, spec)

    def load(server: Server):
        log.info("listening on http://%s:%d; deploying %s of %s on %s", settings.host,
                 server.port, f"{cluster.autoscale[0]}-{cluster.autoscale[1]} replicas"
                 if cluster.autoscale else f"{cluster.replicas} replica(s)", spec.model_name,
                 cluster.address or "a new local Ray cluster")
        deploying.append(loop.run_in_executor(None, connect_and_deploy))
        return deploying[0]

    def ready(server: Server, deployed) -> int | None:
        handle, info = deployed.result()
        if info["gate_error"]:
            return gate_failed(info["gate_error"])
        variants = list(info["variants"])
        server.state.attach(RayEngine(handle, variants, settings.max_queued, cluster.app),
                            variants)
        log.info("ready: %s on http://%s:%d/v1, served by Ray Serve application %r",
                 ", ".join(v.name for v in variants), settings.host, server.port, cluster.app)
        return None

    try:
        return await run_server(settings, load, ready)
    finally:
        if deploying and not deploying[0].done():  # stopped while deploying: let it end
            log.info("waiting for the deployment to finish before deleting it")
            await asyncio.wait(deploying)
        if started:
            await loop.run_in_executor(None, undeploy, cluster, started[0])
