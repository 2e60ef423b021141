"""The synchronous engine: add_request / step / abort.

step() is the whole loop: the scheduler picks this step's sequences and token counts, the
runner computes them in one forward pass and samples, and the engine hands back an output for
every sequence that produced a token, freeing the blocks of those that finished. A request
joins the running batch at the next step and leaves it the step it finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import NibbleError
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import RequestOutput, Sequence, Status


class ContextLengthError(NibbleError, ValueError):
    """Prompt plus requested tokens do not fit the context."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for the server's metrics."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    preemptions: int  # since start
    prefix_cache_hit_tokens: int  # prompt tokens served from cached blocks, since start
    prefix_cache_queried_tokens: int


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, eos_token_ids: set[int], model_name: str,
                 max_num_seqs: int, max_num_batched_tokens: int):
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.model_name = model_name
        cache = runner.cache
        self.blocks = BlockManager(cache.num_blocks, cache.block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self._by_id: dict[str, Sequence] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        max_tokens = self._check_length(len(prompt_token_ids), params)
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        if request_id in self._by_id:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        detok = IncrementalDetokenizer(self.tokenizer, params.stop_list, params.skip_special_tokens)
        seq = Sequence(request_id, prompt, list(prompt_token_ids), params, detok, max_tokens,
                       self.eos_token_ids, generator=gen)
        self._by_id[request_id] = seq
        self.scheduler.add(seq)

    def _check_length(self, prompt_len: int, params: SamplingParams) -> int:
        limit = min(self.runner.max_model_len, self.blocks.num_blocks * self.blocks.block_size)
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
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        sampled = self.runner.run(scheduled)
        for seq, _ in scheduled:
            self.blocks.register(seq.block_table, seq.token_ids_between, seq.num_cached)
        for seq in sampled:
            if seq.status is Status.FINISHED:
                self._drop(seq)
        return [seq.to_output() for seq in sampled]

    def _drop(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        del self._by_id[seq.request_id]

    def abort(self, request_id: str) -> bool:
        """Ends a request at once and frees its blocks; False if it is not in the engine."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return False
        seq.finish("abort")
        self._drop(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        b = self.blocks
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting),
                           b.num_blocks - b.num_free, b.num_free, self.scheduler.num_preemptions,
                           b.prefix_hit_tokens, b.prefix_queried_tokens)
