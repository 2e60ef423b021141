"""Per-request state and what the engine hands back."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockTable
from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}, chosen first
    delta: str = ""  # text that became final in this step (for streaming)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # per prompt token {token: logprob, alternatives...}; None for the first token
    prompt_logprobs: list[dict[int, float] | None] | None = None

    # The single-completion shortcuts of the public API: outs[0].text, .token_ids, ...
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def delta(self) -> str:
        return self.outputs[0].delta


@dataclass(eq=False)  # a request is itself: compared and removed by identity, not by value
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    max_tokens: int
    eos_token_ids: frozenset[int]
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    num_cached: int = 0  # tokens whose keys/values are in the cache
    block_table: BlockTable = field(default_factory=BlockTable)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    index: int = 0  # which of the request's n completions

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first token has nothing before it

    def prompt_logprob_positions(self, start: int, end: int) -> range:
        """Positions among start..end-1 whose row still has to give a prompt logprob: the row
        at position p predicts prompt token p + 1."""
        if self.prompt_logprobs is None:
            return range(0)
        first = max(start, len(self.prompt_logprobs) - 1)
        return range(first, min(end, len(self.prompt_token_ids) - 1))

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncached(self) -> int:
        return self.num_tokens - self.num_cached

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output, without building the whole list (a decode
        step takes one token)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @functools.cached_property
    def logit_bias(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token ids, biases) built once per request instead of once per token."""
        if not self.params.logit_bias:
            return None
        ids, vals = zip(*self.params.logit_bias.items(), strict=True)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(vals, dtype=torch.float32)

    def append(self, token_id: int, logprobs: dict[int, float] | None) -> None:
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(logprobs)
        is_stop_token = token_id in self.params.stop_token_ids or (
            token_id in self.eos_token_ids and not self.params.ignore_eos)
        if not is_stop_token:
            self.detok.add(token_id)
        if is_stop_token or self.detok.stopped:
            self.finish("stop")
        elif len(self.output_token_ids) >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def completion(self, stepped: bool) -> CompletionOutput:
        """This sequence's output so far; stepped: it produced a token this step, so the text
        that became final is handed out as the delta (once)."""
        delta = self.detok.new_text(self.finished) if stepped else ""
        return CompletionOutput(self.index, self.detok.text, list(self.output_token_ids),
                                self.finish_reason, self.logprobs, delta)
