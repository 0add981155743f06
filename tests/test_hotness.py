"""Space-Saving, the sliding-window heavy hitters and the replica planner."""

import math
import random
from collections import Counter

import pytest

from sglang_tokenlake.hotness import HeavyHitters, ReplicaPlanner, SpaceSaving


def test_space_saving_exact_small_stream():
    ss = SpaceSaving(2)
    for key in "aab":
        ss.observe(key)
    assert ss.estimate("a") == (2, 0) and ss.estimate("b") == (1, 0)
    ss.observe("c")  # takes over b's counter (the minimum) and inherits its count
    assert "b" not in ss and ss.estimate("c") == (2, 1) and ss.estimate("b") == (0, 0)
    ss.observe("d")  # a and c tie at 2: the older counter (a) goes
    assert ss.estimate("d") == (3, 2) and "a" not in ss
    assert [k for k, _, _ in ss.items()] == ["d", "c"] and ss.total == 5


def test_space_saving_guarantees_on_a_skewed_stream():
    rng = random.Random(0)
    k = 50
    stream = [int(rng.paretovariate(1.1)) for _ in range(20000)]
    ss = SpaceSaving(k)
    for x in stream:
        ss.observe(x)
    true = Counter(stream)
    n = len(stream)
    for key, c in true.items():
        if c > n / k:
            assert key in ss  # every frequent key is monitored
    for key, est, err in ss.items():
        assert true[key] <= est <= true[key] + n / k
        assert est - err <= true[key]
    assert len(ss) == k


def _planted(rng, n, hot, share):
    """A stream where each of ``hot`` gets ``share`` and the rest is spread over 10^5 keys."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < share * len(hot):
            out.append(hot[int(r / share)])
        else:
            out.append(rng.randrange(10**6, 10**6 + 10**5))
    return out


def test_heavy_hitters_find_exactly_the_planted_hot_set():
    rng = random.Random(7)
    hot = [11, 22, 33, 44, 55]
    hh = HeavyHitters(window=20000, k=128, buckets=4)
    for key in _planted(rng, 60000, hot, 0.04):
        hh.observe(key)
    found = hh.hot(min_share=0.02)
    assert set(found) == set(hot)
    n = hh.observed
    assert 15000 <= n <= 20000  # the window slid: 3 to 4 sub-windows live
    for key in hot:  # within sampling noise plus the estimator's n/k overcount
        assert abs(hh.share(key) - 0.04) < 4 * math.sqrt(0.04 / n) + 1 / 128
    assert hh.share(123456789) == 0.0


def test_hot_segments_cool_down_after_one_window():
    rng = random.Random(3)
    hh = HeavyHitters(window=8000, k=64, buckets=4)
    for key in _planted(rng, 8000, [1, 2], 0.1):
        hh.observe(key)
    assert set(hh.hot(0.05)) == {1, 2}
    for key in _planted(rng, 8000, [3], 0.1):
        hh.observe(key)
    assert set(hh.hot(0.05)) == {3}
    assert hh.share(1) < 0.01


def test_replica_planner_proportional_and_budgeted():
    planner = ReplicaPlanner(budget_tokens=10 * 256, segment_size=256, headroom=0.5)
    # 16 workers: fair share 1/16; target per replica 0.5/16 = 0.03125.
    assert planner.wanted(0.2, 16) == 7
    assert planner.wanted(0.03, 16) == 1
    assert planner.wanted(0.9, 16) == 16  # capped at the pool size
    plan = planner.plan({"a": 0.2, "b": 0.1, "c": 0.05, "d": 0.01}, 16)
    # Wants a:7, b:4, c:2, d:1 = 10 extra replicas, exactly the budget.
    assert plan == {"a": 7, "b": 4, "c": 2}


def test_replica_planner_water_fills_when_short_of_budget():
    planner = ReplicaPlanner(budget_tokens=4 * 100, segment_size=100, headroom=0.5)
    plan = planner.plan({"a": 0.4, "b": 0.2, "c": 0.1}, 64)
    # Extra replicas go to the largest share per copy: a (.4) -> 2 copies (.2 each); a and b
    # tie at .2 and the one with fewer copies goes first: b -> 2 (.1); a -> 3 (.133); a -> 4.
    assert plan == {"a": 4, "b": 2}
    assert ReplicaPlanner(0, 100).plan({"a": 0.9}, 8) == {}
    assert ReplicaPlanner(10**6, 100).plan({"a": 0.9}, 1) == {}


def test_bad_arguments():
    with pytest.raises(ValueError):
        SpaceSaving(0)
    with pytest.raises(ValueError):
        HeavyHitters(window=2, k=8, buckets=4)
    with pytest.raises(ValueError):
        ReplicaPlanner(100, 0)
