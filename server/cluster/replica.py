"""One Ray Serve replica: a whole nibble engine set without the HTTP layer.

It loads what `nibble serve` would load in one process (server.app.prepare: the variants, the
shadow reference, the quality gate) on its TorchThread, then runs the same AsyncEngine,
metrics and shadow scoring (server.app.ServerState). The ingress calls four methods through its
deployment handle: `info` once (the variants it serves, their tokenizers and limits),
`generate` to stream one engine request's outputs, `metrics` for this replica's Prometheus
text, `compare` for a POST /v1/compare job. Errors travel as
values (an APIError or the engine's exception in the stream), so the ingress answers them as
a one-process server would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from server.app import ServerSettings, ServerState, prepare
from server.protocol import APIError, Limits

log = logging.getLogger("nibble.server")


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads: `nibble serve`'s model, variants, shadow and settings."""

    model_name: str
    configs: tuple  # ((quantization label, EngineConfig), ...)
    shadow: tuple[str, EngineConfig] | None
    settings: ServerSettings


@dataclass(frozen=True)
class VariantInfo:
    """What the ingress needs of a replica's variant to validate, tokenize and list it: the
    ingress's variant (server.async_engine.Variant has the same attributes, with the engine
    in the same process)."""

    name: str
    model: str
    quantization: str
    limits: Limits
    max_running: int
    weight_bytes: int
    kernels: dict
    tokenizer: object


class NibbleReplica:
    async def __init__(self, spec: ReplicaSpec):
        from ray import serve

        from server.quality import GateFailed

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.state = ServerState(spec.settings)
        self.gate_error: str | None = None
        try:
            self._loaded = await asyncio.wrap_future(self.state.torch.submit(
                prepare, spec.model_name, list(spec.configs), spec.shadow,
                spec.settings.quality_gate, spec.settings.quality_gate_tokens))
        except GateFailed as exc:  # reported by info(); the ingress exits 3
            self.gate_error, self._loaded = str(exc), ([], None)
        log.info("replica %s loaded %s", self.replica_id,
                 ", ".join(v.name for v in self._loaded[0]))

    def _engine(self):
        """The AsyncEngine, started on the replica's event loop at its first use."""
        if self.state.engine is None:
            self.state.start(*self._loaded)
        return self.state.engine

    async def info(self) -> dict:
        return {"replica": self.replica_id, "gate_error": self.gate_error,
                "variants": [VariantInfo(v.name, v.model, v.quantization, v.limits, v.max_running,
                                         v.weight_bytes, v.kernels, v.tokenizer)
                             for v in self._loaded[0]]}

    async def generate(self, variant: str, prompt_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, waited: float = 0.0):
        """Yields the request's RequestOutputs, or one exception, which ends it. `waited`:
        seconds since the request reached the ingress (its latency clocks start there)."""
        engine = self._engine()
        sink: asyncio.Queue = asyncio.Queue()
        try:
            stream = engine.submit(self.state.variant(variant), prompt_ids, params, sink,
                                   prompt=prompt, arrival=time.perf_counter() - waited)
        except APIError as exc:
            yield exc
            return
        try:
            while True:
                _, out = await sink.get()
                # steps that piled up while the last one was in transit travel as one
                while not sink.empty() and not isinstance(out, Exception) and not out.finished:
                    _, later = sink.get_nowait()
                    if isinstance(later, Exception):
                        yield _slim(out)
                        out = later
                        break
                    out = _merge(out, later)
                yield _slim(out)
                if isinstance(out, Exception) or out.finished:
                    return
        finally:
            engine.abort(stream)  # a no-op once finished; the ingress went away otherwise

    async def metrics(self, replica: str | None = None) -> tuple[str, str]:
        self._engine()
        return self.replica_id, (await self.state.render_metrics()).decode()

    async def compare(self, req) -> dict | APIError:
        self._engine()
        try:
            return await self.state.compare(req)
        except APIError as exc:
            return exc

    def check_health(self) -> None:
        """Ray Serve calls this periodically; a dead engine thread gets the replica replaced."""
        if self.state.engine is not None and self.state.engine.dead is not None:
            raise RuntimeError(f"the engine stopped: {self.state.engine.dead!r}")


def _slim(out):
    """An output as the ingress reads it: without the prompt, which the ingress has (its ids
    stay where an echo's prompt logprobs need them)."""
    if isinstance(out, Exception):
        return out
    ids = out.prompt_token_ids if out.prompt_logprobs is not None else []
    return dataclasses.replace(out, prompt=None, prompt_token_ids=ids)


def _merge(earlier, later):
    """Two consecutive outputs of one request as one: the later (token ids, text and logprobs
    are cumulative) with both steps' new text."""
    before = {c.index: c.delta for c in earlier.outputs}
    return dataclasses.replace(later, outputs=[
        dataclasses.replace(c, delta=before.get(c.index, "") + c.delta) for c in later.outputs])
