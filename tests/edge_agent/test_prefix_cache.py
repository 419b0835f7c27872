"""The prefix cache's decisions on plain arrays: block matching, salts, LRU under a budget."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.prefix_cache import PrefixCache, block_names

B = 4  # tokens per block in these tables


def kv_of(tokens):
    """A fake KV for positions of ``tokens``: each position's value is its token id."""
    arr = np.asarray(tokens, dtype=np.float32)

    def read(a, b):
        return arr[a:b].copy()
    return read


def stored(cache, tokens, salt=None):
    return cache.store(tokens, salt, kv_of(tokens))


def hit(cache, tokens, salt=None) -> list[float]:
    return [float(v) for block in cache.lookup(tokens, salt) for v in block]


@pytest.mark.parametrize("cached, asked, expected", [
    ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8]),
    ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4]),         # whole blocks only
    ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [1, 2, 3, 4]),      # diverges in block 2
    ([1, 2, 3, 4, 5, 6, 7, 8], [0, 2, 3, 4, 5, 6, 7, 8], []),                # differs at the start
    ([1, 2, 3, 4, 5, 6, 7, 8], [5, 6, 7, 8], []),                            # a block elsewhere
    ([1, 2, 3], [1, 2, 3, 4], []),                                           # no whole block stored
])
def test_longest_cached_prefix_in_whole_blocks(cached, asked, expected):
    cache = PrefixCache(10_000, block_tokens=B)
    stored(cache, cached)
    assert hit(cache, asked) == expected


def test_a_block_is_named_by_everything_before_it():
    # the same 4 tokens after different heads are different blocks
    a = block_names([1, 2, 3, 4, 9, 9, 9, 9], None, B)
    b = block_names([5, 6, 7, 8, 9, 9, 9, 9], None, B)
    assert a[1] != b[1]
    assert block_names([1, 2, 3, 4], "t1", B) != block_names([1, 2, 3, 4], "t2", B)
    assert block_names([1, 2, 3, 4], None, B) == block_names([1, 2, 3, 4], "", B)


def test_tenants_never_share_blocks():
    cache = PrefixCache(10_000, block_tokens=B)
    stored(cache, [1, 2, 3, 4, 5], salt="alice")
    assert hit(cache, [1, 2, 3, 4, 5], salt="bob") == []
    assert hit(cache, [1, 2, 3, 4, 5], salt=None) == []
    assert hit(cache, [1, 2, 3, 4, 5], salt="alice") == [1, 2, 3, 4]


def test_stats_count_lookups_hits_and_tokens():
    cache = PrefixCache(10_000, block_tokens=B)
    stored(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    hit(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    hit(cache, [7, 7, 7, 7])
    assert (cache.stats.lookups, cache.stats.hits, cache.stats.hit_tokens) == (2, 1, 8)


def test_storing_again_adds_only_new_blocks():
    cache = PrefixCache(10_000, block_tokens=B)
    assert stored(cache, [1, 2, 3, 4, 5, 6, 7, 8]) == 2
    assert stored(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) == 1
    assert len(cache) == 3 and cache.bytes == 3 * B * 4


def test_least_recently_used_chain_goes_first_tail_before_head():
    block_bytes = B * 4
    cache = PrefixCache(4 * block_bytes, block_tokens=B)
    stored(cache, [1] * 8)                 # chain A: 2 blocks
    stored(cache, [2] * 8)                 # chain B: 2 blocks (full now)
    hit(cache, [1] * 8)                    # A used again: B is now the least recent
    stored(cache, [3] * 4)                 # needs one block: B's tail goes, its head stays
    assert hit(cache, [2] * 8) == [2] * 4
    assert hit(cache, [1] * 8) == [1] * 8 and hit(cache, [3] * 4) == [3] * 4
    assert cache.bytes <= cache.budget_bytes and cache.stats.evicted_blocks == 1


def test_a_prompt_larger_than_the_budget_keeps_its_head():
    cache = PrefixCache(3 * B * 4, block_tokens=B)
    stored(cache, [9] * 4)
    assert stored(cache, list(range(40))) == 3   # 10 blocks asked, 3 fit: the first 3
    assert hit(cache, list(range(40))) == list(range(12))
    assert hit(cache, [9] * 4) == []             # the older entry made room
    assert cache.bytes == cache.budget_bytes


def test_a_budget_of_zero_caches_nothing():
    cache = PrefixCache(0, block_tokens=B)
    assert not cache.enabled
    assert stored(cache, [1, 2, 3, 4]) == 0 and hit(cache, [1, 2, 3, 4]) == []
    assert cache.stats.lookups == 0


def test_clear_forgets_everything_but_blocks_already_handed_out_stay_valid():
    cache = PrefixCache(10_000, block_tokens=B)
    stored(cache, [1, 2, 3, 4])
    blocks = cache.lookup([1, 2, 3, 4], None)
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 and hit(cache, [1, 2, 3, 4]) == []
    assert blocks[0].tolist() == [1, 2, 3, 4]   # a copy: requests using it are unaffected


def test_salts_may_hold_any_unicode():
    cache = PrefixCache(10_000, block_tokens=B)
    stored(cache, [1, 2, 3, 4], salt="\ud800 lone surrogate")
    assert hit(cache, [1, 2, 3, 4], salt="\ud800 lone surrogate") == [1, 2, 3, 4]


def test_a_requested_reset_is_applied_at_the_next_use():
    cache = PrefixCache(10_000, block_tokens=B)
    stored(cache, [1, 2, 3, 4])
    epoch = cache.epoch
    cache.request_reset()                   # from another thread: nothing changes yet ...
    assert len(cache) == 1
    assert hit(cache, [1, 2, 3, 4]) == []   # ... the next lookup starts empty
    assert cache.epoch == epoch + 1 and cache.bytes == 0
