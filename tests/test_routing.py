"""The sglang-router cache_aware baseline: the 0.3.2 rule and the paper-era (0.1.9) variant."""

import pytest

from sglang_tokenlake.sim.routing import (
    ApproxTree,
    CacheAwareConfig,
    CacheAwareRouter,
    RoundRobinRouter,
)

W1, W2, W3 = "http://w1:8000", "http://w2:8000", "http://w3:8000"
IDLE = {W1: 0, W2: 0}


def test_defaults_are_the_installed_routers():
    router_args = pytest.importorskip("sglang_router.router_args")
    ra = router_args.RouterArgs
    cfg = CacheAwareConfig()
    assert cfg.cache_threshold == ra.cache_threshold == 0.3
    assert cfg.balance_abs_threshold == ra.balance_abs_threshold == 64
    assert cfg.balance_rel_threshold == ra.balance_rel_threshold == 1.5
    assert cfg.eviction_interval_s == ra.eviction_interval_secs == 60
    assert cfg.max_tree_size == ra.max_tree_size == 2**26
    assert cfg.fallback == "least_loaded"


def test_v019_variant_is_the_paper_era_rule():
    v = CacheAwareConfig.v019()
    assert (v.cache_threshold, v.balance_abs_threshold, v.balance_rel_threshold) == (0.5, 32, 1.0001)
    assert v.fallback == "smallest_tree" and v.max_tree_size == 2**24
    with pytest.raises(ValueError):
        CacheAwareConfig(fallback="random")


def test_balanced_load_routes_by_prefix():
    # sgl-router test_cache_aware_with_balanced_load; a miss goes to the least loaded worker.
    r = CacheAwareRouter([W1, W2])
    first = r.select("hello world", IDLE)
    assert first == (W1, "least_loaded", 0.0)  # equal loads: the first worker
    assert r.select("hello world", IDLE) == (W1, "cache_hit", 1.0)
    assert r.select("hello", IDLE) == (W1, "cache_hit", 1.0)
    # 0.3.2 ignores tree sizes: W1 holds 11 chars, W2 none, loads are equal -> W1.
    assert r.select("goodbye", IDLE) == (W1, "least_loaded", 0.0)
    assert r.select("farewell", {W1: 1, W2: 0}) == (W2, "least_loaded", 0.0)
    assert r.decisions == {"imbalanced": 0, "cache_hit": 2, "least_loaded": 3}


def test_v019_miss_goes_to_the_smallest_tree():
    r = CacheAwareRouter([W1, W2], CacheAwareConfig.v019())
    assert r.select("hello world", IDLE) == (W1, "smallest_tree", 0.0)  # both empty: the first
    assert r.select("goodbye", IDLE) == (W2, "smallest_tree", 0.0)  # W1 holds 11 chars, W2 0
    assert r.select("hello", {W1: 5, W2: 0}) == (W1, "cache_hit", 1.0)  # 5/5 > 0.5
    assert r.select("hellothere, world!", IDLE) == (W2, "smallest_tree", 5 / 18)  # <= 0.5
    assert r.decisions == {"imbalanced": 0, "cache_hit": 1, "smallest_tree": 3}


def test_least_loaded_ties_go_to_the_first_worker_in_order():
    r = CacheAwareRouter([W1, W2, W3])
    assert r.select("abc", {W1: 3, W2: 1, W3: 1}) == (W2, "least_loaded", 0.0)
    assert r.select("xyz", {W1: 3, W2: 2, W3: 1}) == (W3, "least_loaded", 0.0)
    r = CacheAwareRouter([W3, W2, W1])  # worker order, not names, breaks ties
    assert r.select("abc", {W1: 0, W2: 0, W3: 0}).worker == W3


def test_imbalanced_load_goes_to_the_shortest_queue():
    # sgl-router test_cache_aware_with_imbalanced_load.
    cfg = CacheAwareConfig(cache_threshold=0.5, balance_abs_threshold=5, balance_rel_threshold=2.0)
    r = CacheAwareRouter([W1, W2], cfg)
    r.tree.insert("test", W1)
    for _ in range(5):
        assert r.select("test", {W1: 20, W2: 0}) == (W2, "imbalanced", 0.0)
    assert r.tree.size == {W1: 4, W2: 4}  # imbalanced requests still enter the tree


def test_both_imbalance_conditions_are_required():
    r = CacheAwareRouter([W1, W2])  # abs 64, rel 1.5
    r.tree.insert("abcdefgh", W1)
    assert r.select("abcdefgh", {W1: 300, W2: 210}).reason == "cache_hit"  # 90 > 64, 300 < 315
    assert r.select("abcdefgh", {W1: 100, W2: 40}).reason == "cache_hit"  # 60 <= 64
    assert r.select("abcdefgh", {W1: 100, W2: 30}) == (W2, "imbalanced", 0.0)  # 70 > 64, 100 > 45
    assert r.select("abcdefgh", {W1: 0, W2: 100}) == (W1, "imbalanced", 0.0)


def test_weak_match_goes_to_the_least_loaded_even_with_a_larger_tree():
    # sgl-router test_prove_cache_aware_overload_flaw, before and after upstream PR #14650:
    # with the imbalance test quiet, 0.1.9 sent a miss to the smallest tree however loaded
    # that worker was; 0.3.2 sends it to the least loaded worker whatever its tree holds.
    over, idle = "http://overloaded:8000", "http://idle:8000"
    loads = {over: 50, idle: 0}
    for fallback, expect in (("least_loaded", idle), ("smallest_tree", over)):
        cfg = CacheAwareConfig(cache_threshold=0.5, balance_abs_threshold=100,
                               balance_rel_threshold=10.0, fallback=fallback)
        r = CacheAwareRouter([over, idle], cfg)
        r.tree.insert("short", over)
        r.tree.insert("x" * 1000, idle)
        assert r.select("new_unique_prompt", loads) == (expect, fallback, 0.0)
    # A weak (<= threshold) partial match is a miss too: "xxxx" + 16 new chars is 0.2 of it.
    r = CacheAwareRouter([over, idle], CacheAwareConfig(balance_abs_threshold=100))
    r.tree.insert("xxxx", over)
    assert r.select("xxxx" + "y" * 16, loads) == (idle, "least_loaded", 0.2)


def test_cache_threshold_is_strict():
    def router():
        r = CacheAwareRouter([W1, W2])  # threshold 0.3
        r.tree.insert("abc", W2)
        r.tree.insert("q" * 20, W2)
        r.tree.insert("zzzz", W1)
        return r

    loads = {W1: 0, W2: 2}
    assert router().select("abcdefghij", loads) == (W1, "least_loaded", 0.3)  # 3/10 is not > 0.3
    assert router().select("abcdefghi", loads) == (W2, "cache_hit", 3 / 9)  # W2 though busier


def test_deepest_node_tenant_is_the_first_to_reach_it():
    t = ApproxTree()
    t.insert("abc", W2)
    t.insert("abcd", W1)
    assert t.prefix_match("abcx") == (3, W2)  # "abc" reached by W2 first
    assert t.prefix_match("abcd") == (4, W1)  # only W1 reached "d"
    assert t.prefix_match("zzz") == (0, None)


def test_eviction_drops_least_recently_used_leaves_per_tenant():
    t = ApproxTree()
    t.insert("abcd", W1)
    t.insert("abxy", W1)
    t.insert("ab", W2)
    assert t.size == {W1: 6, W2: 2} and len(t) == 6
    t.evict_tenant_by_size(3)  # W1 drops d, c (oldest leaves), then y
    assert t.size == {W1: 3, W2: 2}
    assert t.prefix_match("abxy") == (3, W1)
    assert t.prefix_match("abcd") == (2, W1)
    assert len(t) == 3  # nodes nobody holds are gone
    t.remove_tenant(W1)
    assert t.prefix_match("abx") == (2, W2) and len(t) == 2


def test_router_evicts_on_its_interval():
    cfg = CacheAwareConfig(eviction_interval_s=10.0, max_tree_size=4, fallback="smallest_tree")
    r = CacheAwareRouter([W1, W2], cfg)
    r.select("aaaaaaaa", IDLE, now=0.0)
    assert r.tree.size[W1] == 8
    r.select("bbbbbbbb", IDLE, now=5.0)  # no eviction yet
    assert r.tree.size == {W1: 8, W2: 8}
    r.select("cc", IDLE, now=10.0)  # evicts first, then routes
    assert r.tree.size[W1] + r.tree.size[W2] == 4 + 4 + 2


def test_block_units_with_lengths():
    r = CacheAwareRouter([W1, W2])
    r.select([1, 2, 3], IDLE, lengths=[512, 512, 100])
    d = r.select([1, 2, 9], IDLE, lengths=[512, 512, 300])
    assert d == (W1, "cache_hit", 1024 / 1324)
    d = r.select([1, 7, 8], IDLE, lengths=[512, 512, 512])
    assert d == (W1, "cache_hit", 512 / 1536)  # 0.33 > 0.3
    d = r.select([1, 5, 6, 8], {W1: 1, W2: 0}, lengths=[512, 512, 512, 512])
    assert d == (W2, "least_loaded", 0.25)


def test_round_robin():
    rr = RoundRobinRouter(["a", "b", "c"])
    assert [rr.select() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
