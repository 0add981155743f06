"""Dispatch's time model fed by measurements: averages, priors, pins, and what the live
pool measures on its own (heartbeat round trips, pulls, prefill passes)."""

from __future__ import annotations

import pytest
from pool_fakes import FakeNet, make_pool
from test_pool_link import A, B, S, _match, _remote_setup, fake_req

from sglang_tokenlake.dispatch import Costs, Link, Mode, ModelShape, plan
from sglang_tokenlake.pool.calibration import (
    ALPHA,
    MIN_TRANSFER_BYTES,
    Average,
    Calibration,
    PassFit,
)


def test_an_average_is_a_plain_mean_at_first_then_weights_new_samples_by_alpha():
    a = Average()
    assert a.get(7.0) == 7.0  # the prior until measured
    a.add(1.0)
    assert a.value == 1.0
    a.add(2.0)
    assert a.value == pytest.approx(1.5)  # the mean of two, not 0.8 x 1 + 0.2 x 2
    a.add(float("nan"))
    a.add(-1.0)  # nonsense is ignored
    assert a.samples == 2
    for _ in range(3):
        a.add(1.5)
    assert a.samples == 5 and a.value == pytest.approx(1.5)
    a.add(2.5)  # past 1 / alpha samples: exponentially weighted
    assert a.value == pytest.approx((1 - ALPHA) * 1.5 + ALPHA * 2.5)


def test_a_rare_slow_shipped_layer_counts_at_its_share_of_the_mean():
    # An owner whose CPU is busy answers most layers at once and some after a long wait;
    # what a shipped request pays is the mean, whatever order the samples came in.
    samples = [0.005] * 9 + [1.0]
    for order in (samples, samples[::-1]):
        c = Calibration(Costs())
        for x in order:
            c.observe_ship("p", x)
        assert c.ship_rtt_of("p") == pytest.approx(sum(samples) / len(samples))


def test_the_prefill_cost_is_the_slope_of_pass_time_over_tokens():
    # A backend that pays 2 s for any extend after a 4K cached prefix, plus 1 ms per new token:
    # a token's marginal cost is 1 ms, not (2 s + 70 ms) / 70 tokens.
    fit = PassFit()
    assert fit.per_token() is None
    for n in (70, 4096, 80, 70, 2048, 90):
        fit.add(n, 2.0 + 1e-3 * n)
    assert fit.per_token() == pytest.approx(1e-3, rel=1e-6)
    same = PassFit()  # passes of one size cannot tell fixed from per-token cost
    for _ in range(5):
        same.add(100, 0.5)
    assert same.per_token() == pytest.approx(0.005)
    c = Calibration(Costs())
    for n in (70, 4096, 80):
        c.observe_prefill(n, 2.0 + 1e-3 * n)
    assert c.costs().recompute_s_per_token == pytest.approx(1e-3, rel=1e-6)


def test_shipped_query_round_trips_are_measured_per_owner_unless_rtt_is_pinned():
    c = Calibration(Costs())
    c.observe_rtt("p", 1e-4)
    c.observe_ship("p", 0.01)
    c.observe_ship("p", 0.02)
    link = c.costs().link("p")
    assert link.rtt_s == pytest.approx(1e-4)
    assert link.ship_rtt_s == pytest.approx(0.015)
    assert c.snapshot()["links"]["p"]["ship_samples"] == 2
    c.pinned["rtt_s"] = 5e-4  # a pinned round trip is used for shipping too
    assert c.costs().link("p") == Link(5e-4, Costs().bandwidth_Bps, 0.0)
    c.forget("p")
    assert "p" not in c.ship_rtt


def test_priors_until_measured_then_measurements_then_pins():
    prior = Costs()
    c = Calibration(prior)
    assert c.costs() == Costs(links={})
    c.observe_prefill(100, 0.5)
    c.observe_rtt("p", 0.002)
    c.observe_transfer("p", 1 << 20, 0.002 + (1 << 20) / 1e8)  # 1 MiB at 100 MB/s
    c.observe_transfer("p", MIN_TRANSFER_BYTES - 1, 10.0)  # too small to tell bandwidth
    got = c.costs(memory_pressure=0.25)
    assert got.recompute_s_per_token == pytest.approx(0.005)
    assert got.links == {"p": Link(pytest.approx(0.002), pytest.approx(1e8))}
    assert got.link("other") == Link(prior.rtt_s, prior.bandwidth_Bps)
    assert got.memory_pressure == 0.25
    snap = c.snapshot()
    assert snap["prefill_source"] == "measured" and snap["links"]["p"]["rtt_samples"] == 1
    pinned = Calibration(prior, prefill_s_per_token=1e-3, rtt_s=5e-4, bandwidth_Bps=2e9)
    pinned.observe_prefill(10, 1.0)
    pinned.observe_rtt("p", 1.0)
    got = pinned.costs()
    assert got.recompute_s_per_token == 1e-3 and got.link("p") == Link(5e-4, 2e9)
    assert got.link("never-seen") == Link(5e-4, 2e9)
    assert pinned.snapshot()["prefill_source"] == "pinned"


def test_a_heartbeat_slower_than_a_pull_does_not_make_the_link_look_infinitely_fast():
    c = Calibration(Costs())
    c.observe_rtt("p", 0.05)  # one late heartbeat echo
    c.observe_transfer("p", 1 << 20, 0.01)  # 1 MiB in 10 ms
    assert c.bandwidth_of("p") == pytest.approx((1 << 20) / 0.005)  # at most half is round trip


def test_heartbeats_and_pulls_calibrate_the_links_and_dispatch_uses_them():
    net, hosts, tokens, keys, raw = _remote_setup("auto")
    a = hosts[A]
    cal = a.pool.calibration
    assert B in cal.rtt and cal.rtt[B].samples >= 1  # heartbeats measured B's round trip
    # Pin a round trip so slow that shipping to B loses to pulling, and a prefill so
    # slow that recomputing loses too.
    cal.pinned["rtt_s"] = 0.05
    cal.pinned["prefill_s_per_token"] = 0.1
    req = fake_req(tokens, max_new=64)
    path, run, device = _match(a, keys, raw, tokens, req)
    decided = a.pool.transfers._decisions.get(req)[1]
    assert {d.mode for d, n in zip(decided, run) if n.value is None} == {Mode.PULL_KV}
    loaded, _ = a.pool.transfers.load_back(req, run[-1], device, len(run) * S)
    assert loaded == len(run) * S
    assert a.pool.status()["calibration"]["links"][B]["rtt_s"] == 0.05
    a.pool.forget(req)


def _chain_at_b():
    """Two workers (auto mode, pinned links); B computed a 32-token chain A can use."""
    from test_pool_link import chain

    net = FakeNet()
    hosts = make_pool(net, [A, B], remote_mode="auto", transient_copies=False, capacity=40,
                      link_rtt=1e-6, link_bandwidth=1e7, prefill_cost=1e-3, placement="segment")
    net.heartbeat()
    tokens = list(range(100, 132))
    hosts[B].compute(tokens)
    for h in hosts.values():
        h.pool.poll()
    return hosts[A], tokens, *chain(tokens)


def test_a_worker_short_of_memory_ships_instead_of_pulling():
    a, tokens, keys, raw = _chain_at_b()
    req = fake_req(tokens, max_new=4)
    _match(a, keys, raw, tokens, req)
    roomy = {d.mode for d in a.pool.transfers._decisions.get(req)[1]} - {Mode.LOCAL}
    held = a.alloc_slots(a.free_tokens())  # running requests take A's free memory
    assert held is not None and a.free_tokens() == 0
    req2 = fake_req(tokens, max_new=4)
    _match(a, keys, raw, tokens, req2)
    pressed = {d.mode for d in a.pool.transfers._decisions.get(req2)[1]} - {Mode.LOCAL}
    assert roomy == {Mode.PULL_KV} and pressed == {Mode.SHIP_QUERY}
    a.free.extend(held.tolist())


def test_a_busy_worker_short_of_memory_pulls_rather_than_stall_its_batch():
    a, tokens, keys, raw = _chain_at_b()
    held = a.alloc_slots(a.free_tokens())  # short of memory: alone, it ships (test above)
    modes = {}
    for running in (0, 1000):
        a.running = running
        req = fake_req(tokens, max_new=4)
        _match(a, keys, raw, tokens, req)
        modes[running] = {d.mode for d in a.pool.transfers._decisions.get(req)[1]} - {Mode.LOCAL}
        a.pool.forget(req)
    assert modes == {0: {Mode.SHIP_QUERY}, 1000: {Mode.PULL_KV}}
    a.free.extend(held.tolist())


def test_until_shipping_to_an_owner_is_measured_a_layer_waits_one_layer_of_a_pass_here():
    c = Calibration(Costs())
    c.observe_rtt("p", 1e-3)  # heartbeats echo at once
    assert c.costs().link("p").ship_rtt_s == 0.0  # nothing measured: the echo is all there is
    c.layers = 4
    c.observe_pass(0.4)
    assert c.costs().link("p").ship_rtt_s == pytest.approx(0.1)  # 0.4 s / 4 layers
    assert c.snapshot()["links"]["p"]["ship_source"] == "passes"
    c.observe_ship("p", 0.02)  # measured: the measurement, not the prior
    assert c.costs().link("p").ship_rtt_s == pytest.approx(0.02)
    assert c.snapshot()["links"]["p"]["ship_source"] == "measured"
    c.pinned["rtt_s"] = 5e-4
    assert c.costs().link("p").ship_rtt_s == 0.0


def test_a_worker_never_ships_blind_to_an_owner_whose_partials_it_has_not_timed():
    # Short of memory, an unmeasured owner looked as fast as its heartbeat echo: every
    # worker shipped once to each owner (12 shipped requests in the longdoc auto run, each
    # stretching its executor's passes). With this worker's own passes as the prior, it pulls.
    shape = ModelShape(layers=4, q_heads=8, kv_heads=2, head_dim=16, dtype_bytes=4)
    keys = list(range(1, 89))  # a 5,632-token context at one owner
    where = {k: {"b"} for k in keys}

    def mode(costs):
        got = plan(keys, where, {}, executor="e", new_tokens=20, expected_output_tokens=16,
                   segment_size=64, shape=shape, costs=costs)
        return {a.mode for a in got}

    # Blind: 1 ms x 4 layers x 17 passes = 0.07 s to ship against 0.06 s of bytes plus
    # 0.5 x 5,632 x 0.7 ms = 2 s of evictions to pull.
    blind = Costs(recompute_s_per_token=7e-4, memory_pressure=1.0, links={"b": Link(1e-3, 1e8)})
    assert mode(blind) == {Mode.SHIP_QUERY}
    c = Calibration(Costs(), prefill_s_per_token=7e-4, bandwidth_Bps=1e8)
    c.layers = 4
    c.observe_rtt("b", 1e-3)
    c.observe_pass(0.5)  # this worker's passes take 0.5 s: 125 ms a layer -> 8.5 s to ship
    assert mode(c.costs(memory_pressure=1.0)) == {Mode.PULL_KV}
