"""PrefixCache bookkeeping: longest-prefix lookup, LRU eviction within the byte budget."""

from __future__ import annotations

import numpy as np

from services.generate.prefix_cache import PrefixCache, common_prefix


def state(n: int) -> bytes:
    return bytes(n)


def test_common_prefix() -> None:
    a = np.array([1, 2, 3, 4], dtype=np.int32)
    assert common_prefix(a, np.array([1, 2, 9], dtype=np.int32)) == 2
    assert common_prefix(a, a[:2]) == 2
    assert common_prefix(a, np.array([], dtype=np.int32)) == 0


def test_lookup_returns_the_longest_shared_prefix_and_never_the_whole_prompt() -> None:
    cache = PrefixCache(10_000, min_tokens=2, min_new_tokens=2)
    system = list(range(100, 120))
    cache.insert(system + [1, 2, 3], b"a" * 10)
    cache.insert(system + [7, 8, 9, 10, 11], b"b" * 10)
    hit = cache.lookup(system + [7, 8, 9, 42])
    assert hit is not None and hit.tokens == len(system) + 3 and hit.state == b"b" * 10
    # the same prompt again: all but its last token (which must be decoded for logits)
    same = system + [1, 2, 3]
    assert cache.lookup(same).tokens == len(same) - 1
    assert cache.lookup([5, 6, 7]) is None  # nothing shared
    assert cache.lookup(system[:1] + [0, 0]) is None  # shorter than min_tokens


def test_eviction_keeps_bytes_within_budget_least_recently_used_first() -> None:
    cache = PrefixCache(300, min_tokens=1, min_new_tokens=1)
    for i in range(3):
        assert cache.insert([i] * 10, state(100))
    assert cache.bytes == 300 and len(cache) == 3
    assert cache.lookup([0] * 10 + [5]) is not None  # use entry 0: entry 1 is now the oldest
    cache.insert([3] * 10, state(100))
    assert cache.bytes <= 300 and len(cache) == 3 and cache.evictions == 1
    assert cache.lookup([1] * 10 + [5]) is None  # evicted
    assert cache.lookup([0] * 10 + [5]) is not None and cache.lookup([2] * 10 + [5]) is not None
    assert not cache.insert([9] * 10, state(301))  # larger than the whole budget
    assert cache.bytes <= 300


def test_a_longer_prompt_replaces_the_entry_it_extends() -> None:
    cache = PrefixCache(1000, min_tokens=1, min_new_tokens=1)
    cache.insert([1, 2, 3], state(10))
    cache.insert([1, 2, 3, 4, 5], state(20))
    assert len(cache) == 1 and cache.bytes == 20


def test_worth_storing_and_hit_ratio() -> None:
    cache = PrefixCache(1000, min_new_tokens=64)
    assert cache.worth_storing(600, 0) and cache.worth_storing(600, 536)
    assert not cache.worth_storing(600, 580)  # a new question over cached passages
    assert not PrefixCache(0).worth_storing(600, 0)  # disabled
    cache.record(600, 0)
    cache.record(600, 540)
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["lookups"] == 2 and stats["hit_ratio"] == 540 / 1200
