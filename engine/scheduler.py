"""Which sequences run in the next forward pass, and how many of their tokens.

Each step has a budget of max_num_batched_tokens rows. Running sequences come first, oldest
first: a decode takes one row, a prompt still being prefilled takes what is left of it or of
the budget (chunked prefill). Waiting sequences then join while the budget, max_num_seqs and
the free KV blocks allow, so prefills and decodes share one forward pass.

When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
from its prompt and the tokens it already produced (nothing it returned is lost or changed).
The engine admits no request longer than the whole cache, so the oldest sequence can always
run alone: there is no deadlock.
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.sequence import Sequence, Status

Scheduled = list[tuple[Sequence, int]]  # (sequence, rows it computes this step)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_first(self, seqs: list[Sequence]) -> None:
        """Queues seqs, in order, ahead of every waiting sequence."""
        self.waiting.extendleft(reversed(seqs))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Scheduled:
        budget = self.max_num_batched_tokens
        out: Scheduled = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted to make room for an older one
                continue
            n = min(seq.num_uncached, budget)
            if not self._make_room(seq, seq.num_cached + n):
                break
            out.append((seq, n))
            budget -= n
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            tokens = seq.token_ids_between(0, seq.num_tokens)
            # prompt logprobs need every prompt row computed: no prefix reuse until they are in
            use_cache = seq.prompt_logprobs is None or \
                len(seq.prompt_logprobs) == len(seq.prompt_token_ids)
            if not self.blocks.can_allocate(tokens, use_cache):
                break
            self.waiting.popleft()
            seq.num_cached = self.blocks.allocate(seq.block_table, tokens, use_cache)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncached, budget)
            out.append((seq, n))
            budget -= n
        return out

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Grows seq's blocks to num_tokens, preempting newer sequences as needed; False when
        seq itself had to be preempted (it is the newest)."""
        while not self.blocks.can_grow(seq.block_table, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.block_table, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_cached, seq.status = 0, Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Drops a finished or aborted sequence wherever it is and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
