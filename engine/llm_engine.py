"""The synchronous engine: add_request / step / abort.

step() is the whole loop: the scheduler picks this step's sequences and token counts, the
runner computes them in one forward pass and samples, and the engine hands back an output for
every request that produced a token, freeing the blocks of sequences that finished. A request
joins the running batch at the next step and leaves it the step it finishes.

A request with n > 1 starts as one sequence. Once its prompt is computed and its blocks are
registered, the other n - 1 completions join the front of the queue as sequences of their own:
they find the prompt's full blocks in the prefix cache and share them (reference counted), so
only the prompt's last, partial block is computed again, once per completion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import NibbleError
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import RequestOutput, Sequence


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


@dataclass(eq=False)
class Request:
    """The n sequences of one request (the first alone until its prompt is computed)."""

    seqs: list[Sequence]
    n: int
    stepped: set[int] = field(default_factory=set)  # indices that produced a token this step

    @property
    def forked(self) -> bool:
        return len(self.seqs) == self.n

    @property
    def finished(self) -> bool:
        return self.forked and all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        first = self.seqs[0]
        outs = [s.completion(s.index in self.stepped) for s in self.seqs]
        self.stepped.clear()
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, outs,
                             self.finished, first.prompt_logprobs)


def completion_seed(seed: int, index: int) -> int:
    """The seed of completion `index` of a request seeded `seed`: the first uses the seed
    itself (n = 1 is unchanged), the others one derived from both, so completions differ."""
    return seed if index == 0 else hash((seed, index)) & 0x7FFF_FFFF_FFFF_FFFF


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, eos_token_ids: set[int], model_name: str,
                 max_num_seqs: int, max_num_batched_tokens: int):
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.model_name = model_name
        cache = runner.cache
        self.blocks = BlockManager(cache.num_blocks, cache.block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self._by_id: dict[str, Request] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        max_tokens = self._check_length(len(prompt_token_ids), params)
        if request_id in self._by_id:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        seq = self._sequence(request_id, prompt, list(prompt_token_ids), params, max_tokens, 0)
        self._by_id[request_id] = Request([seq], params.n)
        self.scheduler.add(seq)

    def _sequence(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                  params: SamplingParams, max_tokens: int, index: int) -> Sequence:
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(completion_seed(params.seed, index))
        detok = IncrementalDetokenizer(self.tokenizer, params.stop_list, params.skip_special_tokens)
        return Sequence(request_id, prompt, prompt_token_ids, params, detok, max_tokens,
                        self.eos_token_ids, generator=gen, index=index)

    def _add_children(self, req: Request) -> None:
        """Queues completions 1..n-1 at the front, now that the prompt's blocks are cached;
        the prompt's logprobs stay with the first."""
        first = req.seqs[0]
        params = dataclasses.replace(first.params, prompt_logprobs=None)
        children = [self._sequence(first.request_id, first.prompt, first.prompt_token_ids,
                                   params, first.max_tokens, i) for i in range(1, req.n)]
        req.seqs += children
        self.scheduler.add_first(children)

    @property
    def context_limit(self) -> int:
        """Prompt + generated tokens one sequence may hold: the context length, or the whole
        KV cache if that is smaller."""
        return min(self.runner.max_model_len, self.blocks.num_blocks * self.blocks.block_size)

    def _check_length(self, prompt_len: int, params: SamplingParams) -> int:
        limit = self.context_limit
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
        stepped: dict[str, Request] = {}
        for seq in sampled:
            req = self._by_id[seq.request_id]
            req.stepped.add(seq.index)
            stepped[seq.request_id] = req
            if seq.finished:
                self.scheduler.finish(seq)
            if not req.forked:
                self._add_children(req)
        outputs = [req.output() for req in stepped.values()]
        for out in outputs:
            if out.finished:
                del self._by_id[out.request_id]
        return outputs

    def abort(self, request_id: str) -> bool:
        """Ends a request (all its completions) at once and frees its blocks; False if it is
        not in the engine."""
        req = self._by_id.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.finished:
                seq.finish("abort")
                self.scheduler.finish(seq)
        return True

    def request_ids(self) -> list[str]:
        return list(self._by_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        b = self.blocks
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting),
                           b.num_blocks - b.num_free, b.num_free, self.scheduler.num_preemptions,
                           b.prefix_hit_tokens, b.prefix_queried_tokens)
