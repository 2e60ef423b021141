"""OpenAI request parsing and validation, and the response and chunk shapes.

No aiohttp here: a body (already decoded JSON) goes in, a typed request comes out, or an
APIError that names the field at fault. Checks that need the model (vocabulary size, context
length) take a `Limits`.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConfigError
from engine.sampling_params import SamplingParams

MAX_STOP = 16  # stop strings per request; each one is searched after every token
MAX_STOP_LEN = 256
MAX_N = 16
MAX_LOGPROBS = 20
CHAT_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An error in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def __reduce__(self):  # crosses process boundaries (Ray replicas -> the ingress)
        return APIError, (self.status, self.message), self.__dict__

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What a variant accepts: vocabulary and context length."""

    vocab_size: int
    max_model_len: int


# ---------------------------------------------------------------- field readers

class Fields:
    """Typed reads of a JSON object; every failure is a 400 naming the field."""

    def __init__(self, body: Any):
        if not isinstance(body, dict):
            raise bad(None, f"the request body must be a JSON object, got {_json_type(body)}")
        self.body = body

    def has(self, name: str) -> bool:
        return self.body.get(name) is not None

    def int(self, name: str, default: int | None, lo: int | None = None,
            hi: int | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(name, f"'{name}' must be an integer, got {_json_type(v)}")
        _range(name, v, lo, hi)
        return v

    def float(self, name: str, default: float, lo: float | None = None,
              hi: float | None = None, lo_open: bool = False) -> float:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise bad(name, f"'{name}' must be a finite number, got {_json_type(v)}")
        if lo_open and lo is not None and v <= lo:
            raise bad(name, f"'{name}' must be greater than {lo}, got {v}")
        _range(name, v, lo, hi)
        return float(v)

    def bool(self, name: str, default: bool) -> bool:
        return self._typed(name, default, bool, "true or false")

    def str(self, name: str, default: str | None = None) -> str | None:
        return self._typed(name, default, str, "a string")

    def _typed(self, name: str, default, kind: type, what: str):
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, kind):
            raise bad(name, f"'{name}' must be {what}, got {_json_type(v)}")
        return v

    def object(self, name: str) -> dict | None:
        v = self.body.get(name)
        if v is not None and not isinstance(v, dict):
            raise bad(name, f"'{name}' must be an object, got {_json_type(v)}")
        return v


def _range(name: str, v, lo, hi) -> None:
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(name, f"'{name}' must be {'in ' if hi is not None else ''}{span}, got {v}")


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(s: str) -> str:
    """Lone surrogates (valid JSON escapes, invalid Unicode) become U+FFFD, so the tokenizer
    never sees them."""
    return _SURROGATE.sub("\ufffd", s)


# ---------------------------------------------------------------- requests

@dataclass
class GenerationRequest:
    """What both endpoints share once parsed."""

    model: str | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    user: str | None
    max_tokens_field: str = "max_tokens"


@dataclass
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False
    logprobs: int | None = None
    score_only: bool = False  # echo with max_tokens 0: prompt logprobs, nothing generated


@dataclass
class ChatRequest(GenerationRequest):
    messages: list[dict] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0


def _sampling(f: Fields, max_tokens: int | None, n: int, logprobs: int | None,
              prompt_logprobs: int | None) -> SamplingParams:
    stop = f.body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("stop", "'stop' must be a string or an array of strings")
        if len(stops) > MAX_STOP:
            raise bad("stop", f"'stop' holds {len(stops)} strings; at most {MAX_STOP} are allowed")
        if any(not s or len(s) > MAX_STOP_LEN for s in stops):
            raise bad("stop", f"each stop string must hold 1 to {MAX_STOP_LEN} characters")
        stop = [clean_text(s) for s in stops]
    seed = f.int("seed", None, -(2**63), 2**64 - 1)
    try:
        return SamplingParams(
            n=n, max_tokens=max_tokens,
            temperature=f.float("temperature", 1.0, 0, 2),
            top_p=f.float("top_p", 1.0, 0, 1, lo_open=True),
            top_k=f.int("top_k", -1, -1),
            min_p=f.float("min_p", 0.0, 0, 1),
            seed=None if seed is None else seed % 2**63,
            stop=stop,
            ignore_eos=f.bool("ignore_eos", False),
            presence_penalty=f.float("presence_penalty", 0.0, -2, 2),
            frequency_penalty=f.float("frequency_penalty", 0.0, -2, 2),
            repetition_penalty=f.float("repetition_penalty", 1.0, 0, 2, lo_open=True),
            logit_bias=_logit_bias(f),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=f.bool("skip_special_tokens", True))
    except ConfigError as exc:  # a rule of the engine's own the checks above did not cover
        raise bad(str(exc).split(" ", 1)[0], str(exc)) from None


def _logit_bias(f: Fields) -> dict[int, float] | None:
    raw = f.object("logit_bias")
    if not raw:
        return None
    if len(raw) > 300:
        raise bad("logit_bias", f"'logit_bias' holds {len(raw)} entries; at most 300 are allowed")
    out = {}
    for k, v in raw.items():
        try:
            tid = int(k)
        except ValueError:
            raise bad("logit_bias", f"'logit_bias' keys must be token ids, got {k!r}") from None
        if not isinstance(v, int | float) or isinstance(v, bool) or not -100 <= v <= 100:
            raise bad("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], got {v!r}")
        out[tid] = float(v)
    return out


def _common(f: Fields) -> tuple[str | None, bool, bool, int, str | None]:
    model = f.str("model")
    stream = f.bool("stream", False)
    opts = f.object("stream_options")
    if opts is not None and not stream:
        raise bad("stream_options", "'stream_options' is only allowed with stream: true")
    include_usage = False
    if opts:
        v = opts.get("include_usage", False)
        if not isinstance(v, bool):
            raise bad("stream_options", "'stream_options.include_usage' must be true or false")
        include_usage = v
    n = f.int("n", 1, 1, MAX_N)
    best_of = f.int("best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise bad("best_of", "'best_of' other than n is not supported")
    user = f.str("user")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if f.has(name):
            raise bad(name, f"'{name}' is not supported: nibble serves plain text generation")
    fmt = f.object("response_format")
    if fmt and fmt.get("type", "text") != "text":
        raise bad("response_format", "only response_format {\"type\": \"text\"} is supported")
    return model, stream, include_usage, n, user


def parse_completion(body: Any) -> CompletionRequest:
    f = Fields(body)
    model, stream, include_usage, n, user = _common(f)
    if f.has("suffix"):
        raise bad("suffix", "'suffix' is not supported")
    prompts = _prompts(body.get("prompt"))
    echo = f.bool("echo", False)
    logprobs = f.int("logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = f.int("max_tokens", 16, 0)
    score_only = max_tokens == 0
    if score_only and not echo:
        raise bad("max_tokens", "'max_tokens' must be at least 1 (0 is allowed only with echo)")
    if score_only and stream:
        raise bad("max_tokens", "'max_tokens' 0 (score the prompt only) cannot be streamed")
    prompt_logprobs = logprobs if echo and logprobs is not None else None
    params = _sampling(f, 1 if score_only else max_tokens, n, logprobs, prompt_logprobs)
    return CompletionRequest(model, params, stream, include_usage, user, "max_tokens",
                             prompts=prompts, echo=echo, logprobs=logprobs, score_only=score_only)


def _prompts(p: Any) -> list[str | list[int]]:
    if p is None:
        raise bad("prompt", "'prompt' is required")
    if isinstance(p, str):
        items: list = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p:
        items = p
    else:
        raise bad("prompt", "'prompt' must be a non-empty string, an array of strings, "
                  "an array of token ids or an array of arrays of token ids")
    if len(items) > 64:
        raise bad("prompt", f"'prompt' holds {len(items)} prompts; at most 64 per request")
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad("prompt", "'prompt' must not be empty")
            out.append(clean_text(item))
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            out.append(list(item))
        else:
            raise bad("prompt", "each prompt must be a non-empty string or a non-empty array "
                      "of token ids")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_chat(body: Any) -> ChatRequest:
    f = Fields(body)
    model, stream, include_usage, n, user = _common(f)
    messages = _messages(body.get("messages"))
    logprobs = f.bool("logprobs", False)
    top = f.int("top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    name = "max_completion_tokens" if f.has("max_completion_tokens") else "max_tokens"
    max_tokens = f.int(name, None, 1)
    params = _sampling(f, max_tokens, n, (top or 0) if logprobs else None, None)
    return ChatRequest(model, params, stream, include_usage, user, name, messages=messages,
                       logprobs=logprobs, top_logprobs=top or 0)


def _messages(msgs: Any) -> list[dict]:
    if msgs is None:
        raise bad("messages", "'messages' is required")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, "
                      f"got {role!r}")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(c: Any, where: str) -> str:
    if isinstance(c, str):
        return clean_text(c)
    if isinstance(c, list) and c:
        parts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad(where, f"{where}: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                          "are supported")
            parts.append(part["text"])
        return clean_text("".join(parts))
    raise bad(where, f"{where} must be a string or an array of text parts")


def parse_tokenize(body: Any) -> tuple[str | None, str | list[dict], bool]:
    """-> (model, prompt text or chat messages, add_special_tokens)."""
    f = Fields(body)
    model = f.str("model")
    if "messages" in body:
        return model, _messages(body["messages"]), False
    prompt = f.str("prompt")
    if prompt is None:
        raise bad("prompt", "give 'prompt' (a string) or 'messages'")
    return model, clean_text(prompt), f.bool("add_special_tokens", True)


def parse_detokenize(body: Any) -> tuple[str | None, list[int]]:
    f = Fields(body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise bad("tokens", "'tokens' must be an array of token ids")
    return f.str("model"), tokens


def check_tokens(ids: list[int], limits: Limits, param: str) -> None:
    if bad_ids := [t for t in ids if not 0 <= t < limits.vocab_size]:
        raise bad(param, f"token id {bad_ids[0]} is outside the vocabulary "
                  f"[0, {limits.vocab_size})", code="invalid_token_id")


def check_request(req: GenerationRequest, prompt_len: int, limits: Limits, param: str) -> None:
    """The context check, before anything is queued or streamed."""
    if req.params.logit_bias:
        check_tokens(list(req.params.logit_bias), limits, "logit_bias")
    room = limits.max_model_len - prompt_len
    mt = req.params.max_tokens
    if room <= 0 or (mt is not None and mt > room):
        asked = f" + {req.max_tokens_field} ({mt})" if mt is not None else ""
        raise APIError(400, f"this model's context length is {limits.max_model_len} tokens; "
                       f"the prompt ({prompt_len} tokens){asked} does not fit. "
                       + (f"Lower {req.max_tokens_field} to at most {room}." if room > 0
                          else "Shorten the prompt."),
                       param=req.max_tokens_field if room > 0 else param,
                       code="context_length_exceeded")


# ---------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


@dataclass(frozen=True)
class CompareRequest:
    """POST /v1/compare: a small A/B job between two loaded variants."""

    a: str | None  # default: the shadow reference, else the first variant
    b: str | None  # default: the first other variant
    ctx: int
    chunks: int
    text: str | None  # corpus; default: the built-in one
    prompts: list[str] | None  # chat prompts for the free-running part; default: built-in
    max_tokens: int
    free_running: bool


MAX_COMPARE_CTX, MAX_COMPARE_CHUNKS, MAX_COMPARE_PROMPTS, MAX_COMPARE_TOKENS = 2048, 32, 16, 256


def parse_compare(body: Any) -> CompareRequest:
    f = Fields(body)
    prompts = body.get("prompts")
    if prompts is not None:
        if (not isinstance(prompts, list) or not prompts
                or not all(isinstance(p, str) and p.strip() for p in prompts)):
            raise bad("prompts", "'prompts' must be a non-empty list of non-empty strings")
        if len(prompts) > MAX_COMPARE_PROMPTS:
            raise bad("prompts", f"'prompts' holds at most {MAX_COMPARE_PROMPTS} strings, got {len(prompts)}")
    text = f.str("text")
    if text is not None and not text.strip():
        raise bad("text", "'text' is empty; leave it out for the built-in corpus")
    return CompareRequest(f.str("a"), f.str("b"), f.int("ctx", 256, 16, MAX_COMPARE_CTX),
                          f.int("chunks", 4, 2, MAX_COMPARE_CHUNKS), text, prompts,
                          f.int("max_tokens", 32, 1, MAX_COMPARE_TOKENS), f.bool("free_running", True))
