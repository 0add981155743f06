"""Eviction orders: ``aware`` (sim cache and tree), the Belady bound, the flags that pick them."""

import math
from dataclasses import replace

import pytest

from sglang_tokenlake.config import TokenLakeConfig
from sglang_tokenlake.eviction import AwareCache, AwareParams, LeafHeap, aware_priority
from sglang_tokenlake.policy import PolicyConfig
from sglang_tokenlake.segments import namespace_seed, segment_bytes, segment_keys
from sglang_tokenlake.sim.__main__ import split
from sglang_tokenlake.sim.belady import BeladyCache
from sglang_tokenlake.sim.cache import PrefixLRU, new_cache
from sglang_tokenlake.sim.engine import simulate
from sglang_tokenlake.sim.model import SimConfig
from sglang_tokenlake.sim.workloads import generated_shared_prefix, loogle_like, sharegpt_like
from sglang_tokenlake.tree import SegmentTree

S = 4
SEED = namespace_seed("test")


def insert(tree, tokens, tag):
    keys, raw = segment_keys(tokens, S, SEED), segment_bytes(tokens, S)
    return tree.insert(keys, raw, [f"{tag}{i}" for i in range(len(keys))])


def match(tree, tokens):
    return tree.match(segment_keys(tokens, S, SEED), segment_bytes(tokens, S))


# -- the score -----------------------------------------------------------------------


def test_priority_adds_lifetimes_per_doubling_of_uses():
    assert aware_priority(10, 1, 0, 50) == 10  # used once: recency alone
    assert aware_priority(10, 4, 0, 50, AwareParams(1.0)) == 10 + 2 * 50
    assert aware_priority(10, 4, 0, 50) == 10 + 2 * 2 * 50  # default: 2 lifetimes per doubling
    assert aware_priority(10, 4, 3, 50, AwareParams(1.0, 0.5)) == 10 + 50 * (2 + 0.5 * 2)
    assert math.isclose(aware_priority(0, 2, 0, 0.1, AwareParams(1.0)), 1.0)  # life >= 1 tick
    with pytest.raises(ValueError):
        AwareParams(freq_weight=-1)
    with pytest.raises(ValueError, match="unknown eviction"):
        PolicyConfig(eviction="mru")


# -- the simulator's cache -----------------------------------------------------------


def test_aware_cache_frequency_beats_recency_where_lru_does_not():
    lru, aw = PrefixLRU(2), AwareCache(2)
    for c in (lru, aw):
        for _ in range(3):
            c.use([1])  # 1: three uses, last at t=3
        c.use([2])  # 2: one use at t=4
    assert lru.use([3]) == [1]  # LRU drops the oldest
    # aware: 1 scores 3 + 2 * log2(3) = 6.2, 2 scores 4, 3 scores 5
    assert aw.use([3]) == [2]
    assert aw.use([4]) == [3]  # 4 scores 6 > 5
    # ...but recency wins in the end: 1's bonus lasts ~log2(3) lifetimes
    out = [aw.use([k])[0] for k in range(5, 12)]
    assert 1 in out and out.index(1) <= 4


def test_aware_cache_is_leaf_first_and_children_protect_ancestors():
    c = AwareCache(3)
    c.touch(10, 1.0)  # an old root...
    c.touch(11, 5.0, parent=10, depth=1)  # ...with a recent child
    c.touch(20, 3.0)
    c.touch(30, 4.0)
    assert c.overflow() == [20]  # 10 is oldest but its child protects it
    c.capacity = 0
    assert c.overflow() == [30, 11, 10]  # a parent goes only after its children


def test_aware_cache_keep_passes_over_and_pending_children():
    c = AwareCache(2)
    c.touch(2, 1.0, parent=1, depth=1)  # child first (callers go deepest first)
    c.touch(1, 1.0)
    c.touch(5, 2.0)
    assert c.overflow(keep=lambda k: k == 2) == [5]
    c.capacity = 1
    assert c.overflow(keep=lambda k: k == 2) == [2]  # nothing else can go
    assert c.keys() == [1] and c.oldest_stamp() == 1.0
    c.discard(1)
    assert len(c) == 0 and c.oldest_stamp() == float("-inf")


def test_aware_cache_ghost_remembers_uses_of_evicted_blocks():
    c = AwareCache(2)
    c.use([1])
    c.use([2])
    assert c.use([3]) == [1]  # the ghost keeps its one use
    assert c.use([1]) == [2]  # back at t=4 with two uses: 4 + life
    assert c._d[1].freq == 2
    assert c.use([4]) == [3]
    assert c.use([5]) == [4] and 1 in c  # 5 < 4 + life


def test_aware_cache_heap_stays_bounded():
    c = AwareCache(8)
    for i in range(5000):
        c.use([i % 3, 100 + i % 11])
    assert len(c) == 8 and len(c._heap) <= 4 * 8 + 64 + 1


def test_new_cache_follows_the_policy():
    assert isinstance(new_cache(4), PrefixLRU)
    assert isinstance(new_cache(4, PolicyConfig(eviction="aware")), AwareCache)


# -- the tree -------------------------------------------------------------------------


def test_tree_aware_prefers_frequent_leaves():
    trees = {e: SegmentTree(S, e) for e in ("lru", "aware")}
    for t in trees.values():
        insert(t, [1] * 4, "x")  # tick 1
        for _ in range(3):
            match(t, [1] * 4)  # ticks 2-4: x0 has 3 hits
        insert(t, [2] * 4, "y")  # tick 5
        insert(t, [3] * 4, "z")  # tick 6
    assert [v for _, v in trees["lru"].evict(S)] == ["x0"]
    # life = 6 - 4; x0 scores 4 + 2 * log2(4) = 8 > y0 (5) and z0 (6)
    assert [v for _, v in trees["aware"].evict(3 * S)] == ["y0", "z0", "x0"]


def test_tree_aware_never_breaks_leaf_first():
    t = SegmentTree(S, "aware")
    insert(t, [1] * 4 + [2] * 4, "a")  # a0 - a1
    for _ in range(5):
        match(t, [1] * 4)  # a0 is hot, a1 is not
    insert(t, [7] * 4, "b")
    dropped = [v for _, v in t.evict(100 * S)]
    assert dropped.index("a1") < dropped.index("a0")
    assert dropped[0] == "a1"  # the cold leaf under the hot root goes first
    assert t.cached_tokens == 0


class _N:
    def __init__(self, i, t):
        self.id, self.t = i, t


def test_leaf_heap_passes_over_kept_nodes_last():
    ns = [_N(i, i) for i in range(4)]
    h = LeafHeap(lambda n: (n.t, n.id))
    for n in ns:
        h.add(n)
    dropped = []

    def drop(n):
        h.discard(n)
        dropped.append(n.id)

    assert h.evict(3, drop, keep=lambda n: n.id < 2) == 3
    assert dropped == [2, 3, 0] and set(h) == {ns[1]}
    assert h.evict(5, drop) == 1 and dropped[-1] == 1 and len(h) == 0 and h.top() is None


def test_leaf_heap_follows_keys_that_grow_and_keys_pushed_smaller():
    ns = [_N(i, 10 + i) for i in range(5)]
    h = LeafHeap(lambda n: (n.t, n.id))
    for n in ns:
        h.add(n)
    ns[0].t = 99  # used: found where it is now when it surfaces
    assert h.top() is ns[1]
    ns[4].t = 1  # made older: its owner says so
    h.push(ns[4])
    h.discard(ns[2])  # no longer a leaf
    order = []
    while (n := h.top()) is not None:
        order.append(n.id)
        h.discard(n)
    assert order == [4, 1, 3, 0]
    # a parent that becomes a leaf during an eviction joins in order
    a, b, c = _N(0, 5), _N(1, 1), _N(2, 3)
    h = LeafHeap(lambda n: (n.t, n.id))
    h.add(b)
    h.add(c)
    dropped = []

    def drop(n):
        h.discard(n)
        dropped.append(n.id)
        if n is b:
            h.add(a)  # b's parent

    assert h.evict(3, drop) == 3 and dropped == [1, 2, 0]


def test_leaf_heap_stays_small_under_churn():
    ns = [_N(i, i) for i in range(10)]
    h = LeafHeap(lambda n: (n.t, n.id))
    for _ in range(1000):  # a hot prefix locked and unlocked by every request
        for n in ns:
            h.discard(n)
            h.add(n)
    assert len(h._heap) <= 2 * len(ns) + 64 + 1
    assert h.top() is ns[0]


def test_config_feeds_the_policy_and_the_tree():
    assert TokenLakeConfig(eviction="aware").policy().eviction == "aware"
    assert TokenLakeConfig().policy().eviction == "lru"
    assert SegmentTree(S, TokenLakeConfig(eviction="aware").policy().eviction).eviction == "aware"
    with pytest.raises(ValueError):
        SegmentTree(S, "fifo")


# -- Belady and the simulator ---------------------------------------------------------


def test_belady_cache_evicts_furthest_next_use():
    c = BeladyCache(2)
    c.next_use.update({1: 5, 2: 9, 3: 7})
    c.use([1])
    c.use([2])
    assert c.use([3]) == [2]


@pytest.mark.parametrize("make", [
    lambda: generated_shared_prefix(groups=6, prompts_per_group=10, system_prompt_len=1024,
                                    question_len=64, output_len=16, seed=1),
    lambda: sharegpt_like(conversations=20, seed=2),
    lambda: loogle_like(requests=80, docs=6, doc_tokens=3000, seed=3),
])
def test_belady_bounds_every_online_policy(make):
    w = make()
    uniq = w.unique_full_blocks()
    for frac in (0.1, 0.3):
        cfg = SimConfig(2, max(1, int(frac * uniq / 2)), w.segment_size, memory_pressure=False,
                        policy=PolicyConfig(replan_every=8))
        best = simulate(w, "belady", cfg).hit_rate
        for ev in ("lru", "aware"):
            c = replace(cfg, policy=replace(cfg.policy, eviction=ev))
            for p in ("limit", "tokenlake", "mooncake"):
                assert simulate(w, p, c).hit_rate <= best + 1e-9, (p, ev, frac)


def test_split_halves_by_time():
    w = sharegpt_like(conversations=10, seed=0)
    a, b = split(w, "first"), split(w, "second")
    assert len(a.requests) + len(b.requests) == len(w.requests)
    assert max(r.arrival_s for r in a.requests) < min(r.arrival_s for r in b.requests)
    assert split(w, "all") is w


def test_tree_order_key_is_the_aware_priority():
    from types import SimpleNamespace

    from sglang_tokenlake.eviction import order_key

    n = SimpleNamespace(designated=True, last_access=7, hits=5, depth=3, id=1)
    for params in (AwareParams(), AwareParams(2.0, 0.5)):
        assert math.isclose(order_key("aware", 40, params)(n)[1],
                            aware_priority(7, 6, 3, 40, params))


def test_tokenlake_eviction_flag():
    import argparse

    p = argparse.ArgumentParser()
    TokenLakeConfig.add_cli_args(p)
    cfg = TokenLakeConfig.from_cli_args(p.parse_args(["--tokenlake-eviction", "aware"]))
    assert cfg.eviction == "aware" and cfg.policy().eviction == "aware"
    assert TokenLakeConfig.from_cli_args(p.parse_args([])).eviction == "lru"
    with pytest.raises(SystemExit):  # argparse: invalid choice
        p.parse_args(["--tokenlake-eviction", "mru"])
