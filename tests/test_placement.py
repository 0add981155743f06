"""Rendezvous placement: exact homes, weights, and how little a join or leave moves."""

import math
import random

import pytest
import xxhash

from sglang_tokenlake.placement import Placement, home, homes, moved, score

FOUR = {f"10.0.0.{i}:7000": 1.0 for i in range(1, 5)}


def _reference(key: int, members: dict[str, float]) -> list[str]:
    """The documented formula, written out independently of the module."""

    def s(m: str, w: float) -> float:
        seed = xxhash.xxh3_64_intdigest(m.encode())
        h = xxhash.xxh3_64_intdigest(key.to_bytes(8, "little"), seed)
        return -w / math.log((h + 0.5) / 2.0**64)

    return [m for m, _ in sorted(members.items(), key=lambda mw: (-s(*mw), mw[0]))]


def test_exact_homes_hand_made():
    assert homes(0, FOUR, 4) == ["10.0.0.4:7000", "10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.1:7000"]
    assert homes(1, FOUR, 2) == ["10.0.0.3:7000", "10.0.0.4:7000"]
    assert home(42, FOUR) == "10.0.0.1:7000"
    assert homes(0xDEADBEEFCAFEF00D, FOUR, 1) == ["10.0.0.3:7000"]
    assert [home(k, {"a:1": 1.0, "b:1": 3.0}) for k in range(10)] == [
        "a:1", "b:1", "a:1", "b:1", "a:1", "b:1", "b:1", "b:1", "a:1", "b:1"]


def test_matches_formula_and_is_order_independent():
    rng = random.Random(1)
    members = {f"h{i}:{9000 + i}": float(rng.choice([1, 2, 5])) for i in range(12)}
    shuffled = dict(sorted(members.items(), key=lambda _: rng.random()))
    for _ in range(300):
        key = rng.getrandbits(64)
        ref = _reference(key, members)
        assert homes(key, members, 12) == ref
        assert homes(key, shuffled, 3) == ref[:3]
        assert home(key, shuffled) == ref[0]
        assert score(key, ref[0], members[ref[0]]) >= score(key, ref[1], members[ref[1]])


def test_exactly_one_home_and_nested_replica_homes():
    p = Placement(FOUR)
    for key in range(2000):
        h = p.home(key)
        assert [m for m in FOUR if home(key, FOUR) == m] == [h]  # one primary, everywhere
        top = p.homes(key, 4)
        assert len(set(top)) == 4 and top[0] == h
        for n in range(1, 5):
            assert p.homes(key, n) == top[:n] == homes(key, FOUR, n)
    assert homes(7, FOUR, 0) == [] and len(homes(7, FOUR, 9)) == 4


@pytest.mark.parametrize("n", [4, 8, 16])
def test_join_moves_about_one_over_n_and_only_to_the_newcomer(n):
    before = {f"w{i}": 1.0 for i in range(n)}
    after = {**before, "new": 1.0}
    keys = range(20000)
    mv = moved(keys, before, after)
    p = 1 / (n + 1)
    tol = 4 * math.sqrt(p * (1 - p) / len(keys))  # 4 sigma of a binomial share
    assert abs(len(mv) / len(keys) - p) < tol
    assert all(home(k, after) == "new" for k in mv)


def test_leave_moves_only_the_leavers_segments():
    before = {f"w{i}": 1.0 for i in range(8)}
    after = {m: w for m, w in before.items() if m != "w3"}
    for k in range(5000):
        if home(k, before) != "w3":
            assert home(k, after) == home(k, before)
        else:
            assert home(k, after) == homes(k, before, 2)[1]  # the runner-up takes it


def test_capacity_weights_share_segments_proportionally():
    members = {"big": 3.0, "small": 1.0, "mid": 2.0}
    keys = 30000
    counts = {m: 0 for m in members}
    for k in range(keys):
        counts[home(k, members)] += 1
    for m, w in members.items():
        p = w / 6.0
        assert abs(counts[m] / keys - p) < 4 * math.sqrt(p * (1 - p) / keys)


def test_weights_must_be_positive_and_members_nonempty():
    with pytest.raises(ValueError):
        home(1, {})
    with pytest.raises(ValueError):
        home(1, {"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError):
        Placement({"a": -1.0})


def test_placement_memo_is_bounded_and_consistent():
    p = Placement(FOUR, max_cached=64)
    for k in range(500):
        assert p.home(k) == home(k, FOUR)
        assert p.homes(k, 2) == homes(k, FOUR, 2)
    assert len(p._home) <= 64
