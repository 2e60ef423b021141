"""Paged KV blocks: who holds which block, and prefix reuse.

A sequence's block table lists the blocks its tokens' keys and values live in. Blocks are
reference counted: sequences whose prompts share a prefix share the blocks of that prefix.

Prefix caching: once a block is full and its keys and values are computed, it is registered
under a hash of its tokens chained with every block before it (so equal hashes mean equal
whole prefixes). A new sequence looks its full prompt blocks up in order and starts with the
ones it finds, which it then does not compute again. A freed block keeps its registration
while it waits in the free pool, and loses it only when it is handed out again (oldest freed
first), so a prefix can be reused after the request that computed it is gone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class BlockTable:
    """One sequence's blocks, and how many of them are registered for reuse."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chain hashes of blocks[:len(hashes)]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got "
                             f"{num_blocks} blocks of {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.by_hash: dict[int, int] = {}
        self.prefix_hit_tokens = 0  # prompt tokens served from cached blocks, ever
        self.prefix_queried_tokens = 0  # prompt tokens looked up, ever

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        bid = self.free_ids.popleft()
        block = self.blocks[bid]
        if block.hash is not None and self.by_hash.get(block.hash) == bid:
            del self.by_hash[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return bid

    def _share(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            self.free_ids.remove(bid)
        block.ref_count += 1

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Registered blocks matching the leading full blocks of token_ids, in order."""
        found, h, bs = [], None, self.block_size
        for i in range(len(token_ids) // bs):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash((h, chunk))
            bid = self.by_hash.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            found.append(bid)
        return found

    def can_allocate(self, token_ids: list[int], use_cache: bool = True) -> bool:
        shared = self.cached_prefix(token_ids[:-1]) if use_cache else []
        reusable_free = sum(1 for b in shared if self.blocks[b].ref_count == 0)
        need = self.blocks_for(len(token_ids)) - len(shared)
        return need <= self.num_free - reusable_free

    def allocate(self, table: BlockTable, token_ids: list[int], use_cache: bool = True) -> int:
        """Blocks for all of token_ids; returns how many leading tokens are already computed
        (prefix hits; never all of them, so the last token's logits are always computed).
        use_cache=False computes every token (a request that wants its prompt's logprobs)."""
        assert not table.blocks, "allocate a sequence once; grow() adds blocks after that"
        shared = self.cached_prefix(token_ids[:-1]) if use_cache else []
        for bid in shared:
            self._share(bid)
        table.blocks = shared + [self._take() for _ in
                                 range(self.blocks_for(len(token_ids)) - len(shared))]
        table.hashes = [self.blocks[b].hash for b in shared]
        hits = len(shared) * self.block_size
        self.prefix_hit_tokens += hits
        self.prefix_queried_tokens += len(token_ids)
        return hits

    def can_grow(self, table: BlockTable, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(table.blocks) <= self.num_free

    def grow(self, table: BlockTable, num_tokens: int) -> None:
        """Adds blocks until the table holds num_tokens tokens."""
        while len(table.blocks) < self.blocks_for(num_tokens):
            table.blocks.append(self._take())

    def register(self, table: BlockTable, tokens: Callable[[int, int], list[int]],
                 num_computed: int) -> None:
        """Makes the full, computed blocks of a sequence findable by later prompts;
        tokens(start, end) gives the sequence's tokens start..end-1."""
        bs = self.block_size
        while len(table.hashes) < num_computed // bs:
            i = len(table.hashes)
            chunk = tuple(tokens(i * bs, (i + 1) * bs))
            h = hash((table.hashes[-1] if table.hashes else None, chunk))
            table.hashes.append(h)
            block = self.blocks[table.blocks[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, chunk
                self.by_hash.setdefault(h, block.id)

    def free(self, table: BlockTable) -> None:
        for bid in reversed(table.blocks):  # the tail first: a prefix outlives its suffixes
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.append(bid)
        table.blocks, table.hashes = [], []
