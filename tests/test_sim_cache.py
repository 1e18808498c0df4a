"""Expert cache policies as plain objects (the interface the real engine will drive too)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.simulator.cache import (
    CACHE_POLICIES,
    BeladyCache,
    CacheCapacity,
    CacheGeometry,
    FutureIndex,
    LFUCache,
    LRUCache,
    MRSCache,
    StaticCache,
    make_cache,
    popularity_order,
)

GEO = CacheGeometry(num_layers=2, num_experts=8, expert_bytes=(100, 100))


def per_layer(n: int) -> CacheCapacity:
    return CacheCapacity("layer", "experts", (n, n))


def replay(cache, sequence, layer=0):
    """Feed single-expert accesses; return the hit flags."""
    out = []
    for clock, e in enumerate(sequence):
        acc = cache.access(layer, [e], clock)
        out.append(bool(acc.hits))
    return out


def test_policy_objects_do_not_import_simpy():
    code = ("import sys; import moesim.simulator.cache, moesim.simulator.prefetch, moesim.simulator.placement; "
            "print('simpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_lru_evicts_the_least_recently_used_and_reports_it():
    c = LRUCache(GEO, per_layer(2))
    assert c.access(0, [1, 2], 0).misses == [1, 2]
    c.access(0, [1], 1)  # 1 is now more recent than 2
    acc = c.access(0, [3], 2)
    assert acc.misses == [3] and acc.evicted == [(0, 2)]
    assert c.contains(0, 1) and c.contains(0, 3) and not c.contains(0, 2)
    assert c.recency_order(0) == [1, 3]


def test_experts_still_to_come_in_the_same_step_are_not_evicted():
    c = LRUCache(GEO, per_layer(2))
    c.access(0, [1, 2], 0)
    # 1 is the LRU entry but this step uses it after 5: 2 must go instead
    acc = c.access(0, [5, 1], 1)
    assert acc.hits == [1] and acc.misses == [5] and acc.evicted == [(0, 2)]


def test_a_step_needing_more_experts_than_slots_streams_through():
    c = LRUCache(GEO, per_layer(2))
    acc = c.access(0, [1, 2, 3, 4], 0)
    assert acc.misses == [1, 2, 3, 4]
    assert acc.evicted == [(0, 1), (0, 2)]  # used ones make room for the rest
    assert c.recency_order(0) == [3, 4]


def test_fifo_ignores_hits():
    c = make_cache("fifo", GEO, per_layer(2))
    assert replay(c, [1, 2, 1, 3, 1]) == [False, False, True, False, False]


def test_lfu_counts_visits_per_request_and_resets():
    c = LFUCache(GEO, per_layer(2))
    replay(c, [1, 1, 1, 2])
    acc = c.access(0, [3], 10)
    assert acc.evicted == [(0, 2)]  # 2 has one visit, 1 has three
    c.reset_request()  # every count back to zero: ties go to the lowest expert index
    acc = c.access(0, [4], 11)
    assert acc.evicted == [(0, 1)]


def test_lfu_counts_every_dispatch_and_keeps_an_evicted_experts_count_as_moe_infinity_does():
    # MoE-Infinity ExpertDispatcher::GPUFetchFunc: incache_visit_count += 1 for every dispatched expert
    # (hit or demand load); a field of the expert's Node, zeroed only by ClearExpertCacheCounts.
    c = LFUCache(GEO, per_layer(2))
    got = replay(c, [2, 3, 3, 2, 1, 3, 1, 2])
    # t4: 1 evicts 2 (tie 2:2 with 3, lower expert index); t5, t6: hits; t7: 2 comes back with its two
    # visits plus this one and evicts 1 (count 2 vs 3's 3). Counting only hits would miss at t5 and t6.
    assert got == [False, False, True, True, False, True, True, False]
    assert c.visit_count(0, 2) == 3 and c.visit_count(0, 1) == 2  # 1 is not resident and keeps its count
    c.reset_request()
    assert c.visit_count(0, 2) == 0 and c.visit_count(0, 3) == 0


def test_lfu_ties_go_to_the_dispatchers_scan_order_not_to_recency():
    # GPUFetchFunc scans experts_[expert][layer] and keeps a node only when its count is strictly smaller
    one_pool = CacheCapacity("global", "experts", (2,))
    c = LFUCache(GEO, one_pool)
    c.access(0, [5], 0)
    c.access(1, [0], 1)
    assert c.access(0, [6], 2).evicted == [(1, 0)]  # expert 0 before expert 5, though 0 is more recent
    c = LFUCache(GEO, one_pool)
    c.access(1, [3], 0)
    c.access(0, [3], 1)
    assert c.access(0, [6], 2).evicted == [(0, 3)]  # same expert index: the lower layer first


def test_lfu_forget_is_the_textbook_rule_kept_for_comparison():
    c = make_cache("lfu-forget", GEO, per_layer(2))
    assert replay(c, [2, 3, 3, 2, 1, 3, 1, 2]) == [False, False, True, True, False, False, False, True]


def test_static_never_admits_and_keeps_its_preload():
    c = StaticCache(GEO, per_layer(2))
    c.preload([(0, 5), (0, 6), (0, 7)])  # only two fit
    assert c.contains(0, 5) and c.contains(0, 6) and not c.contains(0, 7)
    acc = c.access(0, [7, 5], 0)
    assert acc.hits == [5] and acc.misses == [7] and acc.bypassed == [7] and acc.evicted == []
    assert not c.insert(0, 7, 1).admitted


def test_byte_capacity_evicts_until_the_bytes_fit():
    geo = CacheGeometry(2, 8, (100, 300))
    c = LRUCache(geo, CacheCapacity("global", "bytes", (450,)))
    c.access(0, [1], 0)
    c.access(0, [2], 1)
    c.access(0, [3], 2)  # 300 bytes used
    acc = c.access(1, [0], 3)  # +300: evict 1 and 2 (oldest) to fit 450
    assert acc.evicted == [(0, 1), (0, 2)]
    assert c.used() == 400


def _belady_hits_brute_force(sequence, capacity):
    """Optimal hits over every eviction choice (with bypass), for a tiny sequence."""
    best = 0

    def walk(i, cache, hits):
        nonlocal best
        if i == len(sequence):
            best = max(best, hits)
            return
        x = sequence[i]
        if x in cache:
            walk(i + 1, cache, hits + 1)
            return
        if len(cache) < capacity:
            walk(i + 1, cache | {x}, hits)
            return
        walk(i + 1, cache, hits)  # bypass
        for v in cache:
            walk(i + 1, (cache - {v}) | {x}, hits)

    walk(0, frozenset(), 0)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_optimal_on_small_sequences(seed):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, 5, size=11).tolist()
    uses: dict[int, list[int]] = {}
    for clock, e in enumerate(seq):
        uses.setdefault(e, []).append(clock)
    c = BeladyCache(CacheGeometry(1, 8, (1,)), CacheCapacity("layer", "experts", (2,)))
    c.attach_future(FutureIndex(uses))
    hits = sum(replay(c, seq))
    assert hits == _belady_hits_brute_force(seq, 2)
    for rule in ("lru", "lfu", "fifo"):
        other = make_cache(rule, CacheGeometry(1, 8, (1,)), CacheCapacity("layer", "experts", (2,)))
        assert hits >= sum(replay(other, seq))


def test_belady_without_a_future_is_an_error():
    c = BeladyCache(GEO, per_layer(1))
    with pytest.raises(RuntimeError, match="attach_future"):
        c.access(0, [1], 0)


def test_mrs_evicts_the_lowest_decayed_score():
    c = MRSCache(GEO, per_layer(2), alpha=0.5, top_p=12)
    c.observe(0, [1, 2], [0.9, 0.1])
    c.access(0, [1, 2], 0)
    c.observe(0, [3], [1.0])  # scores: 1 -> 0.225, 2 -> 0.025, 3 -> 0.5
    acc = c.access(0, [3], 1)
    assert acc.evicted == [(0, 2)]
    assert c.scores[0, 1] == pytest.approx(0.225)


def test_prefetch_insert_makes_room_but_respects_protection():
    c = LRUCache(GEO, per_layer(2))
    c.access(1, [1, 2], 0)
    ins = c.insert(1, 4, 1, protect={1 * 8 + 1})
    assert ins.admitted and ins.evicted == [(1, 2)]
    assert c.insert(1, 4, 2).admitted and c.insert(1, 4, 2).evicted == []  # already resident


def test_popularity_order_per_layer_and_global():
    counts = np.array([[0, 5, 1, 0], [9, 0, 0, 2]])
    geo = CacheGeometry(2, 4, (1, 1))
    per_layer_order = popularity_order(counts, CacheCapacity("layer", "experts", (1, 1)), geo)
    assert per_layer_order[:4] == [(0, 1), (0, 2), (0, 0), (0, 3)]
    assert popularity_order(counts, CacheCapacity("global", "experts", (2,)), geo)[:3] == [(1, 0), (0, 1), (1, 3)]


def test_registry_lists_every_rule_and_rejects_unknown_ones():
    assert set(CACHE_POLICIES.names()) == {"lru", "lfu", "lfu-forget", "fifo", "static", "belady", "mrs"}
    with pytest.raises(MoesimError, match="expected one of"):
        make_cache("arc", GEO, per_layer(1))
    with pytest.raises(MoesimError):
        CacheCapacity("layers", "experts", (1,))


def test_all_rules_keep_capacity_under_random_access():
    rng = np.random.default_rng(1)
    steps = [tuple(rng.choice(8, size=2, replace=False).tolist()) for _ in range(200)]
    uses: dict[int, list[int]] = {}
    for clock, st in enumerate(steps):
        for e in st:
            uses.setdefault(e, []).append(clock)
    for rule in CACHE_POLICIES.names():
        c = make_cache(rule, GEO, per_layer(3))
        if isinstance(c, BeladyCache):
            c.attach_future(FutureIndex(uses))
        if isinstance(c, StaticCache):
            c.preload(itertools.product([0], range(3)))
        for clock, st in enumerate(steps):
            c.access(0, st, clock)
            assert len(c) <= 3 and c.used(0) <= 3
