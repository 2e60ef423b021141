"""One handler per endpoint: parse, submit, stream or return JSON.

Tokenization and chat templating run in a thread pool, never on the event loop. A handler that
ends early (the client went away, an error) aborts its engine requests in `finally`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from engine.tokenizer import apply_chat_template, tokenizer_info
from server.async_engine import EngineDeadError, Stream, Variant
from server.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    bad,
    check_request,
    check_tokens,
    new_id,
    now,
    parse_chat,
    parse_compare,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
    usage,
)
from server.responses import Choice, Renderer

log = logging.getLogger("nibble.server")


class Routes:
    def __init__(self, state):
        self.state = state  # server.app.ServerState

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/tokenizer_info", self.tokenizer_info)
        app.router.add_post("/v1/compare", self.compare)

    # ---------------------------------------------------------------- plumbing

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()  # over client_max_size: 413, turned into our schema upstream
        if not raw.strip():
            raise bad(None, "the request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise bad(None, f"the request body is not valid JSON: {exc}") from None

    def _variant(self, name: str | None) -> Variant:
        st = self.state
        if st.phase != "ready":
            raise APIError(503, f"the server is {st.phase}; retry when /health says ok",
                           code=st.phase)
        return st.variant(name)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.state.pool, fn, *args)

    # ---------------------------------------------------------------- generation

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.perf_counter()
        req = parse_completion(await self._body(request))
        v = self._variant(req.model)
        self.state.engine.check_capacity(v, len(req.prompts))
        encoded = await self._off_loop(_encode_prompts, v.tokenizer, req.prompts, req.echo)
        for ids, _ in encoded:
            check_tokens(ids, v.limits, "prompt")
            check_request(req, len(ids), v.limits, "prompt")
        return await self._generate(request, req, v, encoded, "cmpl", arrival)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        arrival = time.perf_counter()
        req = parse_chat(await self._body(request))
        v = self._variant(req.model)
        self.state.engine.check_capacity(v, 1)
        ids = await self._off_loop(_encode_chat, v.tokenizer, req.messages)
        check_request(req, len(ids), v.limits, "messages")
        return await self._generate(request, req, v, [(ids, None)], "chatcmpl", arrival)

    async def _generate(self, request: web.Request, req: CompletionRequest | ChatRequest,
                        v: Variant, prompts: list[tuple[list[int], str | None]],
                        prefix: str, arrival: float) -> web.StreamResponse:
        engine = self.state.engine
        sink: asyncio.Queue = asyncio.Queue()
        streams: list[Stream] = []
        render = Renderer(req, v.name, new_id(prefix), now(), self.state.token_text(v))
        n = req.params.n
        echo = isinstance(req, CompletionRequest) and req.echo
        choices = {(tag, i): Choice(tag * n + i, prefix=(text or "") if echo else "")
                   for tag, (_, text) in enumerate(prompts) for i in range(n)}
        try:
            for tag, (ids, text) in enumerate(prompts):
                streams.append(engine.submit(v, ids, req.params, sink, tag, prompt=text,
                                             arrival=arrival))
            prompt_tokens = sum(len(ids) for ids, _ in prompts)
            outputs = _Outputs(sink, self.state.settings.queue_timeout, arrival)
            # nothing is sent before the first output, so a request that cannot start in time
            # is still refused with a status
            first = await outputs.get()
            if req.stream:
                return await self._stream(request, render, outputs, first, choices, len(prompts),
                                          prompt_tokens)
            finals, item = {}, first
            while True:
                tag, out = item
                if isinstance(out, Exception):
                    raise _engine_error(out)
                if out.finished:
                    finals[tag] = out
                if len(finals) == len(prompts):
                    break
                item = await outputs.get()
            done = [(choices[(tag, c.index)], c, out) for tag, out in finals.items() for c in out.outputs]
            body = render.body(done, usage(prompt_tokens, _completion_tokens(req, finals.values())))
            return web.json_response(body, dumps=_dumps)
        finally:
            for s in streams:
                engine.abort(s)  # a no-op for finished requests

    async def _stream(self, request: web.Request, render: Renderer, outputs: _Outputs, first,
                      choices: dict, num_prompts: int, prompt_tokens: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        finals, item = {}, first
        try:
            while True:
                tag, out = item
                if isinstance(out, Exception):
                    raise _engine_error(out)
                for c in out.outputs:
                    for chunk in render.chunks(choices[(tag, c.index)], c, out):
                        await resp.write(_event(chunk))
                if out.finished:
                    finals[tag] = out
                if len(finals) == num_prompts:
                    break
                item = await outputs.get()
            if render.req.include_usage:
                tokens = _completion_tokens(render.req, finals.values())
                await resp.write(_event(render.usage_chunk(usage(prompt_tokens, tokens))))
        except APIError as exc:  # the headers went out: one error event, then [DONE]
            await resp.write(_event(exc.body()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # ---------------------------------------------------------------- the rest

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list",
                                  "data": [self._model_card(v) for v in self.state.variants]})

    async def model(self, request: web.Request) -> web.Response:
        return web.json_response(self._model_card(self.state.variant(request.match_info["model"])))

    def _model_card(self, v: Variant) -> dict:
        return {"id": v.name, "object": "model", "created": self.state.created,
                "owned_by": "nibble", "root": v.model, "quantization": v.quantization,
                "weight_bytes": v.weight_bytes, "max_model_len": v.limits.max_model_len,
                "kernels": v.kernels}

    async def health(self, request: web.Request) -> web.Response:
        phase = self.state.phase
        return web.json_response({"status": "ok" if phase == "ready" else phase},
                                 status=200 if phase == "ready" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=await self.state.render_metrics(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def tokenize(self, request: web.Request) -> web.Response:
        model, prompt, special = parse_tokenize(await self._body(request))
        v = self._variant(model)
        if isinstance(prompt, list):
            ids = await self._off_loop(_encode_chat, v.tokenizer, prompt)
        else:
            ids = await self._off_loop(lambda: v.tokenizer.encode(prompt, add_special_tokens=special))
        return web.json_response({"tokens": ids, "count": len(ids),
                                  "max_model_len": v.limits.max_model_len})

    async def detokenize(self, request: web.Request) -> web.Response:
        model, tokens = parse_detokenize(await self._body(request))
        v = self._variant(model)
        check_tokens(tokens, v.limits, "tokens")
        text = await self._off_loop(v.tokenizer.decode, tokens)
        return web.json_response({"prompt": text})

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        """The variant's special tokens, chat template and context length, so that a client
        can tokenize and template with nothing but the server's URL (lm-eval's remote
        tokenizer reads this, then calls /tokenize and /detokenize). `?model=` picks the
        variant, the first by default."""
        v = self._variant(request.query.get("model"))
        return web.json_response({"model": v.name, **tokenizer_info(v.tokenizer),
                                  "model_max_length": v.limits.max_model_len}, dumps=_dumps)

    async def compare(self, request: web.Request) -> web.Response:
        """A small A/B job between two loaded variants (default: the shadow reference or the
        first variant, against the first other); returns the compare report's JSON."""
        req = parse_compare(await self._body(request))
        if self.state.phase != "ready":
            self._variant(None)  # the 503 of a server that is not ready
        return web.json_response(await self.state.compare(req))


class _Outputs:
    """A request's (tag, output) items from the engine. The first must come within
    `queue_timeout` seconds of the request's arrival, else 429 (the caller aborts the request)."""

    def __init__(self, sink: asyncio.Queue, queue_timeout: float | None, arrival: float):
        self.sink = sink
        self.deadline = None if queue_timeout is None else arrival + queue_timeout

    async def get(self):
        if self.deadline is None:
            return await self.sink.get()
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.perf_counter())):
                item = await self.sink.get()
        except TimeoutError:
            raise APIError(429, "the server could not start this request within its queue "
                           "timeout; retry shortly", code="queue_timeout") from None
        self.deadline = None
        return item


def _encode_prompts(tokenizer, prompts: list[str | list[int]], echo: bool):
    """-> [(token ids, text)]; the text of a token-id prompt is decoded only for echo."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((tokenizer.encode(p), p))
        else:
            out.append((p, tokenizer.decode(p) if echo and all(0 <= t < len(tokenizer) for t in p)
                        else None))
    return out


def _encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    try:
        return apply_chat_template(tokenizer, messages)
    except Exception as exc:  # the template's own checks (role order, ...) are the user's to fix
        if type(exc).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):
            raise bad("messages", f"the chat template rejected the messages: {exc}") from None
        raise


def _completion_tokens(req, finals) -> int:
    if isinstance(req, CompletionRequest) and req.score_only:
        return 0
    return sum(len(c.token_ids) for out in finals for c in out.outputs)


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc), code="engine_dead")
    if isinstance(exc, ValueError):
        return bad(None, str(exc))
    log.error("request failed in the engine: %r", exc)
    return APIError(500, f"the engine failed on this request: {exc!r}", code="internal_error")


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _event(obj) -> bytes:
    return f"data: {_dumps(obj)}\n\n".encode()
