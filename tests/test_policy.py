"""PoolPolicy: the one policy the simulator and the live pool call (plain Python)."""

from __future__ import annotations

import math

import pytest

from sglang_tokenlake.dispatch import Mode
from sglang_tokenlake.hotness import HeavyHitters, merge_shares, top_view
from sglang_tokenlake.placement import homes
from sglang_tokenlake.policy import PolicyConfig, PoolPolicy
from sglang_tokenlake.tree import SegmentTree

MEMBERS = {"a:1": 100.0, "b:2": 100.0, "c:3": 100.0, "d:4": 100.0}


def policy(**kw) -> PoolPolicy:
    kw.setdefault("placement", "segment")  # the per-segment rule unless a test names another
    return PoolPolicy(PolicyConfig(**kw), 16, MEMBERS)


def test_place_prefers_the_candidate_with_the_larger_horizon():
    pol = policy(placement_choices=2)
    for key in range(200):
        first, second = homes(key, MEMBERS, 2)
        assert pol.place(key, {}) == [first]  # no horizons known: rendezvous order
        assert pol.place(key, {first: 5.0, second: 5.0}) == [first]  # ties: rendezvous order
        assert pol.place(key, {first: 1.0, second: 9.0}) == [second]
        assert pol.place(key, {first: math.inf, second: 9.0}) == [first]
        assert pol.is_home(key, first) and pol.is_home(key, second)
        others = set(MEMBERS) - {first, second}
        assert not any(pol.is_home(key, o) for o in others)


def test_one_choice_is_strict_rendezvous():
    pol = policy(placement_choices=1)
    for key in range(100):
        h = homes(key, MEMBERS, 1)
        assert pol.place(key, {m: float(i) for i, m in enumerate(MEMBERS)}) == h
        assert [m for m in MEMBERS if pol.is_home(key, m)] == h


def test_a_run_of_new_segments_is_placed_by_the_configured_rule():
    keys = list(range(40, 52))
    horizons = {"a:1": 3.0, "b:2": 8.0, "c:3": 1.0, "d:4": 5.0}
    seg = policy(placement="segment")
    assert seg.place_run(keys, "c:3", horizons) == {k: seg.place(k, horizons) for k in keys}
    chain = policy(placement="chain")
    deepest = chain.place(keys[-1], horizons)
    assert chain.place_run(keys, "c:3", horizons) == dict.fromkeys(keys, deepest)
    ex = policy(placement="executor", replica_budget=0.5)
    assert ex.place_run(keys, "c:3", horizons) == dict.fromkeys(keys, ["c:3"])
    assert ex.place_run([], "c:3", horizons) == {}
    # a hot segment still goes to its homes; an executor outside the pool does not keep
    ex.plan_replicas({keys[3]: 0.6})
    c = ex.copies[keys[3]]
    out = ex.place_run(keys, "x:9", horizons)
    assert out[keys[3]] == homes(keys[3], MEMBERS, c)
    assert out[keys[0]] == ex.place(keys[-1], horizons)
    with pytest.raises(ValueError, match="placement must be one of"):
        PolicyConfig(placement="nearest")


def test_with_chain_placement_any_holder_is_a_home_and_holders_agree_on_one():
    pol = policy(placement="executor")
    for key in range(100):
        ranked = homes(key, MEMBERS, 4)
        assert pol.candidates(key) == ranked
        assert all(pol.is_home(key, m) for m in MEMBERS)
        a, b = ranked[1], ranked[3]
        assert pol.keeps(key, a, {b}) and not pol.keeps(key, b, {a})
        assert pol.keeps(key, b, set()) and pol.held_enough(key, {b})
        assert not pol.held_enough(key, set())
    seg = policy(placement="segment", placement_choices=2)
    for key in range(100):
        first, second, third, _ = homes(key, MEMBERS, 4)
        assert seg.keeps(key, second, {third}) and not seg.keeps(key, third, set())
        assert not seg.keeps(key, second, {first}) and not seg.held_enough(key, {third})


def test_hot_segments_get_their_copies_and_report_changes():
    pol = policy(replica_budget=0.5, placement_choices=1)
    changed = pol.plan_replicas({7: 0.6, 8: 0.01})
    assert changed == {7}
    c = pol.copies[7]
    assert c > 1
    assert pol.place(7, {}) == homes(7, MEMBERS, c)
    assert all(pol.is_home(7, m) for m in homes(7, MEMBERS, c))
    assert pol.plan_replicas({7: 0.6}) == set()  # nothing changed
    assert pol.plan_replicas({}) == {7}  # cooled down
    assert pol.copies == {}


def test_no_replicas_without_budget_or_peers():
    assert policy(replica_budget=0.0).plan_replicas({1: 0.9}) == set()
    alone = PoolPolicy(PolicyConfig(replica_budget=0.5), 16, {"a:1": 100.0})
    assert alone.plan_replicas({1: 0.9}) == set() and alone.is_home(1, "a:1")


def test_keep_last_copy_rule():
    pol = policy()
    assert pol.keep_last_copy(True, 0)
    assert not pol.keep_last_copy(True, 1)  # another member still holds it
    assert not pol.keep_last_copy(False, 0)  # nothing hangs under it
    assert not policy(pool_leaf_first=False).keep_last_copy(True, 0)


def test_dispatch_uses_the_policy_segment_size_and_replicas():
    pol = policy()
    out = pol.dispatch([1, 2, 3], {1: {"a:1"}, 2: {"b:2", "c:3"}, 3: set()}, {"b:2": 10.0},
                       executor="a:1", new_tokens=16, expected_output_tokens=4)
    assert [a.mode for a in out][0] is Mode.LOCAL
    assert out[1].worker == "c:3"  # the less loaded replica
    assert out[2].mode is Mode.RECOMPUTE


def test_a_pinned_remote_mode_serves_every_remote_segment_in_it():
    # Slow links: left to itself dispatch recomputes b's segment; pinned, it pulls or
    # ships it from the less loaded replica, and a local or uncached segment is unchanged.
    from sglang_tokenlake.dispatch import Assignment, Costs

    slow = Costs(bandwidth_Bps=1e3, rtt_s=10.0)
    locs = {1: {"a:1"}, 2: {"b:2", "c:3"}, 3: set()}

    def modes(pol, **kw):
        return pol.dispatch([1, 2, 3], locs, {"b:2": 10.0}, executor="a:1", new_tokens=16,
                            expected_output_tokens=4, costs=slow, **kw)

    assert modes(policy())[1] == Assignment(2, "a:1", Mode.RECOMPUTE)
    for rule, mode in (("pull", Mode.PULL_KV), ("ship", Mode.SHIP_QUERY)):
        got = modes(policy(remote_mode=rule))
        assert got == [Assignment(1, "a:1", Mode.LOCAL), Assignment(2, "c:3", mode),
                       Assignment(3, "a:1", Mode.RECOMPUTE)]
    # A worker that cannot ship pulls, whatever the configured mode.
    assert modes(policy(remote_mode="ship"), pin=Mode.PULL_KV)[1].mode is Mode.PULL_KV
    with pytest.raises(ValueError, match="pin must be"):
        modes(policy(), pin=Mode.RECOMPUTE)


def test_config_is_validated():
    for bad in ({"replica_budget": 1.5}, {"hot_window": 4}, {"hot_k": 1}, {"replan_every": 0},
                {"placement_choices": 0}, {"remote_mode": "fast"}):
        with pytest.raises(ValueError):
            PolicyConfig(**bad)


def test_merged_hot_view_sums_counts_over_observations():
    a, b = HeavyHitters(1000, 16), HeavyHitters(1000, 16)
    for _ in range(30):
        a.observe(1)
    for _ in range(70):
        a.observe(2)
    for _ in range(100):
        b.observe(3)
    views = [top_view(a, 16), top_view(b, 16)]
    assert views[0] == ({2: 70, 1: 30}, 100)
    shares = merge_shares(views, 0.2)
    assert shares == {3: 0.5, 2: 0.35}
    assert list(shares) == [3, 2]  # hottest first
    assert merge_shares([], 0.1) == {}


def test_tree_evict_passes_over_kept_leaves_until_nothing_else_is_left():
    t = SegmentTree(1)
    t.insert([1], b"\0" * 8, ["v1"])  # oldest
    t.insert([2], b"\1" * 8, ["v2"])
    t.insert([3], b"\2" * 8, ["v3"])
    kept = {1}
    out = t.evict(2, keep=lambda n: n.key in kept)
    assert [n.key for n, _ in out] == [2, 3]
    out = t.evict(1, keep=lambda n: n.key in kept)
    assert [n.key for n, _ in out] == [1]
    t.check()
