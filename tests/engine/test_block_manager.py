"""Block accounting and prefix reuse, without a model."""

from __future__ import annotations

from engine.block_manager import BlockManager, BlockTable


def _computed(bm: BlockManager, tokens: list[int]) -> tuple[BlockTable, int]:
    """A sequence over `tokens` that has computed all of them."""
    table = BlockTable()
    hits = bm.allocate(table, tokens)
    bm.register(table, lambda a, b: tokens[a:b], len(tokens))
    return table, hits


def test_shared_prefix_blocks_are_reused_and_reference_counted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = list(range(10))  # blocks [0..3] [4..7] [8, 9]
    ta, hits = _computed(bm, a)
    assert hits == 0 and len(ta.blocks) == 3 and bm.num_free == 7
    tb, hits = _computed(bm, a[:8] + [99, 98, 97])
    assert hits == 8 and tb.blocks[:2] == ta.blocks[:2] and tb.blocks[2] != ta.blocks[2]
    assert bm.num_free == 6  # 11 tokens = 3 blocks: two shared, one new
    bm.free(ta)
    assert bm.num_free == 7  # only a's own last block came back
    bm.free(tb)
    assert bm.num_free == 10
    assert bm.prefix_hit_tokens == 8 and bm.prefix_queried_tokens == 21


def test_a_freed_prefix_stays_findable_until_its_block_is_reused():
    bm = BlockManager(num_blocks=3, block_size=4)
    prompt = list(range(9))
    t, _ = _computed(bm, prompt)
    bm.free(t)
    t2, hits = _computed(bm, prompt)
    assert hits == 8  # both full blocks found in the free pool
    bm.free(t2)
    other, _ = _computed(bm, [50 + i for i in range(12)])  # takes every block
    bm.free(other)
    _, hits = _computed(bm, prompt)
    assert hits == 0


def test_the_last_token_is_never_served_from_the_cache():
    bm = BlockManager(num_blocks=4, block_size=4)
    prompt = list(range(8))  # exactly two blocks
    t, _ = _computed(bm, prompt)
    _, hits = _computed(bm, prompt)
    assert hits == 4  # the second block holds the last token: computed again


def test_can_allocate_counts_free_blocks_a_hit_would_take():
    bm = BlockManager(num_blocks=2, block_size=4)
    prompt = list(range(5))
    t, _ = _computed(bm, prompt)
    bm.free(t)
    assert bm.can_allocate(prompt)  # one cached block from the pool + one new
    assert not bm.can_allocate(list(range(100, 112)))  # three blocks
