"""The synchronous engine: add_request / step / abort.

step() runs one forward pass and returns what changed. Requests are served first come,
first served, one at a time, until the continuous-batching scheduler takes over.
"""

from __future__ import annotations

from collections import deque

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.errors import NibbleError
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import RequestOutput, Sequence, Status


class ContextLengthError(NibbleError, ValueError):
    """Prompt plus requested tokens do not fit the context."""


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, eos_token_ids: set[int], model_name: str):
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.model_name = model_name
        self.waiting: deque[Sequence] = deque()
        self.running: Sequence | None = None

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        max_tokens = self._check_length(len(prompt_token_ids), params)
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop_list, params.skip_special_tokens)
        self.waiting.append(Sequence(request_id, prompt, list(prompt_token_ids), params, detok,
                                     max_tokens, self.eos_token_ids, generator=gen))

    def _check_length(self, prompt_len: int, params: SamplingParams) -> int:
        limit = self.runner.max_model_len
        if prompt_len == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if params.max_tokens is None:
            if prompt_len >= limit:
                raise ContextLengthError(f"the prompt ({prompt_len} tokens) fills the context length "
                                         f"{limit} of {self.model_name}; shorten it")
            return limit - prompt_len
        if prompt_len + params.max_tokens > limit:
            room = limit - prompt_len
            fix = f"lower max_tokens to at most {room}" if room > 0 else "shorten the prompt"
            raise ContextLengthError(
                f"max_tokens ({params.max_tokens}) + prompt ({prompt_len}) exceeds the context "
                f"length {limit} of {self.model_name}; {fix}.")
        return params.max_tokens

    def step(self) -> list[RequestOutput]:
        seq = self._current()
        if seq is None:
            return []
        self.runner.step(seq)
        if seq.status is Status.FINISHED:
            self.running = None
        return [seq.to_output()]

    def _current(self) -> Sequence | None:
        if self.running is None and self.waiting:
            self.running = self.waiting.popleft()
            self.running.status = Status.RUNNING
        return self.running

    def abort(self, request_id: str) -> bool:
        if self.running is not None and self.running.request_id == request_id:
            self.running.finish("abort")
            self.running = None
            return True
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return True
        return False

    def has_unfinished(self) -> bool:
        return self.running is not None or bool(self.waiting)
