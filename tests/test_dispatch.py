"""Dispatch: byte costs, exact plans on hand-made cases, and the load-balancing bound."""

import itertools
import random

import pytest

from sglang_tokenlake.dispatch import (
    Assignment,
    Costs,
    Link,
    Mode,
    ModelShape,
    balance,
    plan,
    pull_pressure,
)

SHAPE = ModelShape()  # 32 layers, 32 q heads, 8 kv heads, head_dim 128, bf16
SEG = 256


def test_byte_costs_of_the_default_shape():
    # K and V: 2 * 8 heads * 128 * 2 bytes * 32 layers = 131072 bytes per token.
    assert SHAPE.kv_bytes(1) == 131072
    assert SHAPE.kv_bytes(SEG) == 33_554_432
    # Q out + O back (2 * 32 * 128 * 2 bytes) + fp32 LSE (4 * 32) per layer, 32 layers.
    assert SHAPE.query_bytes(1) == (16384 + 128) * 32 == 528_384
    assert ModelShape(layers=1, q_heads=1, kv_heads=1, head_dim=1, dtype_bytes=1).kv_bytes(3) == 6


def _plan(segs, locations, loads, new, out, costs=None):
    costs = costs or Costs()
    return plan(segs, locations, loads, executor="e", new_tokens=new,
                expected_output_tokens=out, segment_size=SEG, shape=SHAPE, costs=costs)


def test_long_prompt_pulls_kv_and_balances_replicas():
    locations = {1: {"e", "a"}, 2: {"a"}, 3: {"a", "b"}}  # 4: nobody
    got = _plan([1, 2, 3, 4], locations, {"a": 1.0, "b": 0.0}, new=1000, out=100)
    assert got == [
        Assignment(1, "e", Mode.LOCAL),
        Assignment(2, "a", Mode.PULL_KV),  # only a holds it
        Assignment(3, "b", Mode.PULL_KV),  # b is less loaded than a
        Assignment(4, "e", Mode.RECOMPUTE),
    ]


NO_RTT = Costs(rtt_s=0.0)  # a link where only bytes count


def test_short_query_ships_to_owners():
    # 10 new + 20 output tokens: 30 * 528384 = 15.9 MB per owner < 33.5 MB per segment.
    locations = {1: {"a"}, 2: {"a"}, 3: {"a"}, 4: {"b"}}
    got = _plan([1, 2, 3, 4], locations, {}, new=10, out=20, costs=NO_RTT)
    assert [(a.worker, a.mode) for a in got] == [
        ("a", Mode.SHIP_QUERY), ("a", Mode.SHIP_QUERY), ("a", Mode.SHIP_QUERY),
        ("b", Mode.SHIP_QUERY)]


def test_mode_is_chosen_per_owner_by_time():
    # 100 query tokens: 52.8 MB to ship; a holds 3 segments (100.7 MB to pull) -> ship;
    # b holds 1 (33.5 MB to pull) -> pull.
    locations = {1: {"a"}, 2: {"a"}, 3: {"a"}, 4: {"b"}}
    got = _plan([1, 2, 3, 4], locations, {}, new=100, out=0, costs=NO_RTT)
    assert [a.mode for a in got] == [Mode.SHIP_QUERY] * 3 + [Mode.PULL_KV]


def test_round_trips_per_layer_and_step_make_shipping_lose_to_pulling():
    # Same request as above: shipping to b pays 32 layers x 21 passes round trips.
    # 50 us each: 33.6 ms + 0.63 ms of bytes + 0.03 ms attention > pulling b's segment
    # (50 us + 1.34 ms); at 1 us per round trip shipping wins (0.67 + 0.66 ms).
    locations = {1: {"b"}}
    slow_rtt = Costs(rtt_s=50e-6)
    assert _plan([1], locations, {}, new=10, out=20, costs=slow_rtt)[0].mode is Mode.PULL_KV
    fast_rtt = Costs(rtt_s=1e-6)
    assert _plan([1], locations, {}, new=10, out=20, costs=fast_rtt)[0].mode is Mode.SHIP_QUERY
    c = slow_rtt
    ship = c.ship_s(SHAPE, "b", 30, 21, SEG)
    assert ship == pytest.approx(50e-6 * 32 * 21 + SHAPE.query_bytes(30) / 25e9
                                 + 3.4e-9 * 30 * SEG)
    assert c.pull_s(SHAPE, SEG, "b") == pytest.approx(50e-6 + SHAPE.kv_bytes(SEG) / 25e9)


def test_each_owner_is_timed_over_its_own_link():
    # a's link is measured slow (1 MB/s): its segment is recomputed; b's is pulled.
    costs = Costs(links={"a": Link(1e-3, 1e6)})
    got = _plan([1, 2], {1: {"a"}, 2: {"b"}}, {}, new=1000, out=10, costs=costs)
    assert [(a.worker, a.mode) for a in got] == [("e", Mode.RECOMPUTE), ("b", Mode.PULL_KV)]


def test_a_measured_slow_owner_loses_shipping_although_its_heartbeats_are_fast():
    # b answers heartbeats in 1 us, but its shipped queries come back after 5 ms (it is
    # busy with its own batches): 32 layers x 21 passes x 5 ms = 3.4 s > pulling.
    locations = {1: {"b"}}
    fast = Costs(links={"b": Link(1e-6, 25e9)})
    assert _plan([1], locations, {}, new=10, out=20, costs=fast)[0].mode is Mode.SHIP_QUERY
    busy = Costs(links={"b": Link(1e-6, 25e9, ship_rtt_s=5e-3)})
    assert _plan([1], locations, {}, new=10, out=20, costs=busy)[0].mode is Mode.PULL_KV
    assert busy.ship_s(SHAPE, "b", 30, 21, SEG) == pytest.approx(
        5e-3 * 32 * 21 + SHAPE.query_bytes(30) / 25e9 + 3.4e-9 * 30 * SEG)


def test_memory_pressure_makes_pulling_cost_its_evictions():
    # 1 query token, 10 steps at 10 us round trips: shipping 3.2 ms + bytes; pulling
    # 1.35 ms with free memory, but 1.35 ms + 0.5 x 256 x 103 us = 14.5 ms when every
    # pulled byte must evict a cached one.
    locations = {1: {"b"}}
    assert _plan([1], locations, {}, new=1, out=9)[0].mode is Mode.PULL_KV
    pressed = Costs(memory_pressure=1.0)
    assert _plan([1], locations, {}, new=1, out=9, costs=pressed)[0].mode is Mode.SHIP_QUERY


def test_pull_pressure_is_the_part_of_a_pull_that_free_memory_cannot_hold():
    assert pull_pressure(0, 0) == 0.0  # nothing to pull
    assert pull_pressure(512, 1024) == 0.0 and pull_pressure(512, 512) == 0.0
    assert pull_pressure(512, 256) == 0.5
    assert pull_pressure(512, 0) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        pull_pressure(-1, 0)
    with pytest.raises(ValueError, match=">= 0"):
        pull_pressure(256, -5)


def test_a_running_batch_makes_shipping_and_recompute_cost_its_stalls():
    # The pressed case above ships (3.4 ms against 14.5 ms). Every shipped layer's wait
    # stalls the executor's whole running batch: 4 requests -> 4 x 3.2 ms + 0.2 ms =
    # 13.0 ms still ships; 8 -> 25.8 ms, and the pull (which stalls nobody) wins.
    locations = {1: {"b"}}
    for batch, mode in ((1, Mode.SHIP_QUERY), (4, Mode.SHIP_QUERY), (8, Mode.PULL_KV)):
        costs = Costs(memory_pressure=1.0, batch=batch)
        assert _plan([1], locations, {}, new=1, out=9, costs=costs)[0].mode is mode, batch
    # Recompute stalls the batch too: 256 x 103 us = 26 ms beats a 50 ms pull alone,
    # not beside 2 running requests (79 ms).
    slowish = Costs(bandwidth_Bps=33_554_432 / 0.05)
    assert _plan([1], locations, {}, new=1000, out=0, costs=slowish)[0].mode is Mode.RECOMPUTE
    busy = Costs(bandwidth_Bps=33_554_432 / 0.05, batch=3)
    assert _plan([1], locations, {}, new=1000, out=0, costs=busy)[0].mode is Mode.PULL_KV


def test_slow_links_recompute_on_the_executor():
    slow = Costs(bandwidth_Bps=1e6)  # 33.5 s to pull a segment, 26 ms to prefill it
    got = _plan([1, 2], {1: {"a"}, 2: {"e"}}, {}, new=1000, out=10, costs=slow)
    assert got == [Assignment(1, "e", Mode.RECOMPUTE), Assignment(2, "e", Mode.LOCAL)]


def test_balance_spreads_and_respects_initial_load():
    reps = {k: {"a", "b"} for k in range(4)}
    got = balance(list(range(4)), reps, {}, 1.0)
    assert sorted(got.values()) == ["a", "a", "b", "b"]
    got = balance(list(range(4)), reps, {"a": 3.0}, 1.0)
    loads = {"a": 3.0, "b": 0.0}
    for w in got.values():
        loads[w] += 1.0
    assert max(loads.values()) == 4.0  # the optimum


def test_balance_follows_alternating_paths():
    # Greedy: y -> b (tie b/c, by id), x -> a (tie a/b at load 1, by id): a = 2. The only
    # improvement is two hops long: x moves a -> b, displacing y from b to c.
    got = balance(["y", "x"], {"y": {"b", "c"}, "x": {"a", "b"}}, {"a": 1.0}, 1.0)
    assert got == {"y": "c", "x": "b"}
    # One hop: x -> a, y -> c, z -> a (ties by id); moving x to b gives 1/1/1.
    got = balance(["x", "y", "z"], {"x": {"a", "b"}, "y": {"a", "c"}, "z": {"a", "c"}}, {}, 1.0)
    assert sorted(got.values()) == ["a", "b", "c"]


def _opt(segs, reps, base, unit):
    best = float("inf")
    for choice in itertools.product(*[sorted(reps[k]) for k in segs]):
        load = dict(base)
        for w in choice:
            load[w] = load.get(w, 0.0) + unit
        best = min(best, max(load.values()))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_balance_is_within_one_unit_of_optimal_and_optimal_from_equal_loads(seed):
    rng = random.Random(seed)
    workers = ["a", "b", "c", "d"][: rng.randint(2, 4)]
    segs = list(range(rng.randint(1, 7)))
    reps = {k: set(rng.sample(workers, rng.randint(1, len(workers)))) for k in segs}
    unit = 1.0
    for base in ({w: 0.0 for w in workers}, {w: rng.uniform(0, 3) for w in workers}):
        got = balance(segs, reps, base, unit)
        load = dict(base)
        for k, w in got.items():
            assert w in reps[k]
            load[w] += unit
        opt = _opt(segs, reps, base, unit)
        assert max(load.values()) <= opt + unit + 1e-9
        if len(set(base.values())) == 1:
            assert max(load.values()) == pytest.approx(opt)


def test_never_assigns_a_segment_to_a_worker_that_lacks_it():
    rng = random.Random(5)
    workers = [f"w{i}" for i in range(8)]
    for _ in range(300):
        segs = [rng.getrandbits(64) for _ in range(rng.randint(1, 30))]
        locations = {k: set(rng.sample(workers, rng.randint(0, 3))) for k in segs}
        ex = rng.choice(workers)
        loads = {w: rng.uniform(0, 2) for w in workers}
        out = plan(segs, locations, loads, executor=ex, new_tokens=rng.randint(1, 5000),
                   expected_output_tokens=rng.randint(0, 500), segment_size=SEG)
        assert [a.key for a in out] == segs
        for a in out:
            if a.mode is Mode.RECOMPUTE:
                assert a.worker == ex
            else:
                assert a.worker in locations[a.key]
            if a.mode is Mode.LOCAL:
                assert a.worker == ex
        # One mode per owner: its segments travel together.
        per_owner = {}
        for a in out:
            if a.mode in (Mode.SHIP_QUERY, Mode.PULL_KV):
                assert per_owner.setdefault(a.worker, a.mode) is a.mode
