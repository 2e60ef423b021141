"""Response bodies and stream chunks in OpenAI's shapes, logprobs included.

A `Choice` follows one completion of one prompt through a request: what text and tokens it has
handed out so far, so that a stream chunk carries only what is new and the final body is the
same whether or not the request streamed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from engine.sequence import CompletionOutput, RequestOutput
from server.protocol import ChatRequest, CompletionRequest, finish_reason


class TokenText:
    """Token id -> its text and its bytes, cached per tokenizer."""

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte map

        self.tok = tokenizer
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()}

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per loaded variant
    def text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def bytes(self, token_id: int) -> list[int]:
        """The token's own UTF-8 bytes, even when it holds part of a character."""
        piece = self.tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(c in self._byte_of for c in piece):
            return [self._byte_of[c] for c in piece]  # byte-level BPE (GPT-2 style)
        return list(self.text(token_id).encode("utf-8"))


@dataclass
class Choice:
    index: int
    prefix: str = ""  # echoed prompt text, handed out with the first chunk
    tokens_sent: int = 0  # tokens whose logprobs went out
    offset: int = 0  # text_offset of the next token (completions logprobs)
    started: bool = False  # the first chunk (chat: the role) went out
    done: bool = False  # the finish chunk went out


class Renderer:
    """Builds one request's bodies and chunks."""

    def __init__(self, req: CompletionRequest | ChatRequest, model: str, rid: str, created: int,
                 text: TokenText):
        self.req, self.model, self.rid, self.created, self.tt = req, model, rid, created, text
        self.chat = isinstance(req, ChatRequest)
        self._score_only = not self.chat and req.score_only

    # ---------------------------------------------------------------- logprobs

    def completion_logprobs(self, ch: Choice, ids: list[int],
                            dicts: list[dict[int, float] | None]) -> dict:
        """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, d in zip(ids, dicts, strict=True):
            s = self.tt.text(tid)
            out["tokens"].append(s)
            out["token_logprobs"].append(None if d is None else d[tid])
            out["top_logprobs"].append(None if d is None else {self.tt.text(t): lp for t, lp in d.items()})
            out["text_offset"].append(ch.offset)
            ch.offset += len(s)
        return out

    def chat_logprobs(self, ids: list[int], dicts: list[dict[int, float]]) -> dict:
        k = self.req.top_logprobs
        content = []
        for tid, d in zip(ids, dicts, strict=True):
            top = sorted(d.items(), key=lambda kv: -kv[1])[:k]
            content.append({"token": self.tt.text(tid), "logprob": d[tid],
                            "bytes": self.tt.bytes(tid),
                            "top_logprobs": [{"token": self.tt.text(t), "logprob": lp,
                                              "bytes": self.tt.bytes(t)} for t, lp in top]})
        return {"content": content}

    def _new_logprobs(self, ch: Choice, c: CompletionOutput, out: RequestOutput) -> dict | None:
        """Logprobs of the tokens not yet handed out (and, on an echo's first chunk, the
        prompt's); None when the request asked for none."""
        if not self.req.logprobs and (self.chat or self.req.logprobs is None):
            return None
        end = 0 if self._score_only else len(c.token_ids)
        ids, dicts = c.token_ids[ch.tokens_sent:end], (c.logprobs or [])[ch.tokens_sent:end]
        ch.tokens_sent = max(ch.tokens_sent, end)
        if self.chat:
            return self.chat_logprobs(ids, dicts)
        if ch.prefix and not ch.started and out.prompt_logprobs is not None:
            ids = out.prompt_token_ids + ids
            dicts = list(out.prompt_logprobs) + dicts
        return self.completion_logprobs(ch, ids, dicts)

    # ---------------------------------------------------------------- streaming

    def chunks(self, ch: Choice, c: CompletionOutput, out: RequestOutput) -> list[dict]:
        """The chunks one step's output makes for one choice (none when nothing is new)."""
        if ch.done:  # later outputs of the request repeat a finished completion
            return []
        finished = ch.done = c.finish_reason is not None
        delta = "" if self._score_only else c.delta
        logprobs = self._new_logprobs(ch, c, out)
        reason = finish_reason(c.finish_reason) if finished else None
        chunks = []
        if self.chat:
            if not ch.started:
                chunks.append(self._chat_chunk(ch.index, {"role": "assistant", "content": ""}, None, None))
                ch.started = True
            if delta or logprobs and logprobs["content"]:
                chunks.append(self._chat_chunk(ch.index, {"content": delta}, logprobs, None))
            if finished:
                chunks.append(self._chat_chunk(ch.index, {}, None, reason))
        else:
            text = delta
            if not ch.started:
                text, ch.started = ch.prefix + text, True
            if text or logprobs and logprobs["tokens"] or finished:
                chunks.append({"id": self.rid, "object": "text_completion", "created": self.created,
                               "model": self.model, "choices": [{
                                   "index": ch.index, "text": text, "logprobs": logprobs,
                                   "finish_reason": reason}]})
        if self.req.include_usage:
            for chunk in chunks:
                chunk["usage"] = None
        return chunks

    def _chat_chunk(self, index: int, delta: dict, logprobs, reason) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": reason}]}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": usage}

    # ---------------------------------------------------------------- whole bodies

    def body(self, finals: list[tuple[Choice, CompletionOutput, RequestOutput]], usage: dict) -> dict:
        choices = []
        for ch, c, out in sorted(finals, key=lambda f: f[0].index):
            logprobs = self._new_logprobs(ch, c, out)
            reason = finish_reason(c.finish_reason)
            if self.chat:
                choices.append({"index": ch.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": logprobs, "finish_reason": reason})
            else:
                text = ch.prefix + ("" if self._score_only else c.text)
                choices.append({"index": ch.index, "text": text, "logprobs": logprobs,
                                "finish_reason": reason})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": usage,
                **({"system_fingerprint": None} if self.chat else {})}
