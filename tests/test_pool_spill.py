"""Spilling (pool/spill.py): the pool's last copy of a segment moves to older data.

Live pool objects over ``pool_fakes`` (no SGLang, no sockets); every scenario ends
with each worker's slot accounting checked against an independent count.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from pool_fakes import LAYERS, SEED, FakeNet, kv_of, make_pool

from sglang_tokenlake import kvio
from sglang_tokenlake.policy import PolicyConfig, PoolPolicy
from sglang_tokenlake.pool.spill import chains, hops_of
from sglang_tokenlake.segments import keys_from_bytes, segment_bytes

S = 4
A, B, C = "w0:1", "w1:2", "w2:3"
X = list(range(1000, 1032))  # 8 segments, B's old context
Y = list(range(2000, 2032))  # 8 segments, A's context
Z = list(range(3000, 3008))  # 2 segments that make A evict 2 of Y's


def _keys(tokens):
    return keys_from_bytes(segment_bytes(tokens, S), S, SEED)


def _poll(hosts):
    for h in hosts.values():
        h.pool.poll()


def _slots(host, key):
    base, off = host.tree.nodes[key].value
    return base[off : off + S]


def _kv_at(host, key, layer):
    slots = _slots(host, key)
    return host.kv.k_buffer[layer][slots], host.kv.v_buffer[layer][slots]


def _scene(net, **cfg):
    """B full of X, used long ago; A full of Y, just used; both horizons announced.
    Spilling on (``spill_margin`` 2) unless ``cfg`` says otherwise."""
    cfg.setdefault("spill_margin", 2.0)
    hosts = make_pool(net, [A, B], capacity=32, heartbeat_interval=0.05, **cfg)
    net.heartbeat()
    hosts[B].compute(X)
    _poll(hosts)
    time.sleep(0.4)
    hosts[A].compute(Y)
    time.sleep(0.06)
    _poll(hosts)
    net.heartbeat()
    assert hosts[A].pool.horizons()[B] >= 0.35 and hosts[A].free_tokens() == 0
    return hosts


def test_a_last_copy_moves_to_the_member_with_older_data_which_evicts_that_instead():
    net = FakeNet()
    hosts = _scene(net)
    a, b = hosts[A], hosts[B]
    ky, kx = _keys(Y), _keys(X)
    a.compute(Z)  # A must evict 2 segments: Y's deepest two, the pool's only copies
    assert a.evicted == [ky[7], ky[6]]
    # B stored them (designated, the same KV) and evicted its own oldest leaves, X's
    # deepest two: B's X is older than Y by more than the margin, so it is not spilled back.
    assert b.evicted == [kx[7], kx[6]]
    for k, lo in ((ky[6], 24), (ky[7], 28)):
        node = b.tree.nodes[k]
        assert node.value is not None and node.designated
        for layer in range(LAYERS):
            want_k, want_v = kv_of(Y, layer)
            got_k, got_v = _kv_at(b, k, layer)
            assert torch.equal(got_k, want_k[lo : lo + S]) and torch.equal(got_v, want_v[lo : lo + S])
    c = a.pool.counters.snapshot()
    assert c["spilled_segments"] == 2 and c["spill_puts"] == 1 and "spill_failures" not in c
    # A counts B as their owner at once; nothing was lost to the pool at A, 2 at B
    assert a.tree.nodes[ky[7]].owners == {B} and a.tree.nodes[ky[6]].owners == {B}
    assert (a.stats.evicted_segments, a.stats.evicted_last_copies) == (2, 0)
    assert (b.stats.evicted_segments, b.stats.evicted_last_copies) == (2, 2)
    assert b.pool.counters.snapshot().get("spilled_segments", 0) == 0
    # each arrived handed over once since its last use (the put's ``hops``)
    for k in (ky[6], ky[7]):
        assert b.tree.nodes[k].spilled == (1, b.tree.nodes[k].last_access) and hops_of(b.tree.nodes[k]) == 1
    _poll(hosts)  # announcements: A now knows B holds Y's tail, B knows A holds its head
    assert a.tree.nodes[ky[7]].owners == {B} and a.tree.nodes[ky[7]].value is None
    assert b.tree.nodes[ky[5]].owners == {A} and b.tree.nodes[ky[5]].value is None
    # A's next request on Y: its head is local and the tail is in the pool, not lost
    run = a.pool.transfers.remote_run(ky, segment_bytes(Y, S), 6)
    assert [n.key for n in run] == [ky[6], ky[7]]
    for h in hosts.values():
        h.check()


def test_without_spilling_the_last_copy_leaves_the_pool():
    net = FakeNet()
    hosts = _scene(net, spill_margin=0)
    a, b = hosts[A], hosts[B]
    ky = _keys(Y)
    a.compute(Z)
    assert a.evicted == [ky[7], ky[6]] and b.evicted == []
    _poll(hosts)
    assert ky[7] not in b.tree.nodes and ky[7] not in a.tree.nodes
    assert "spill_puts" not in a.pool.counters.snapshot()
    assert a.stats.evicted_last_copies == 2
    for h in hosts.values():
        h.check()


def test_a_spill_that_fails_loses_the_segment_and_its_owner_entry():
    net = FakeNet()
    hosts = _scene(net)
    a, b = hosts[A], hosts[B]
    ky = _keys(Y)
    net.dropped = lambda peer, kind, h: kind == "put"  # the put times out
    a.compute(Z)
    assert a.evicted == [ky[7], ky[6]] and b.evicted == []
    c = a.pool.counters.snapshot()
    assert c["spill_puts"] == 1 and c["spill_failures"] == 2 and c.get("spilled_segments", 0) == 0
    assert ky[7] not in a.tree.nodes and ky[6] not in a.tree.nodes  # no owner is left
    assert a.pool.transfers.remote_run(ky, segment_bytes(Y, S), 6) == []
    for h in hosts.values():
        h.check()


def test_a_segment_handed_over_spill_hops_times_since_its_last_use_is_dropped():
    net = FakeNet()
    hosts = _scene(net, spill_hops=2)
    a, b = hosts[A], hosts[B]
    ky = _keys(Y)
    n6, n7 = a.tree.nodes[ky[6]], a.tree.nodes[ky[7]]
    n7.spilled = (2, n7.last_access)  # arrived by its second hand-over, unused since
    n6.spilled = (2, n6.last_access - 1)  # the same, but a request used it since: reset
    assert (hops_of(n7), hops_of(n6)) == (2, 0)
    a.compute(Z)
    assert a.evicted == [ky[7], ky[6]]
    c = a.pool.counters.snapshot()
    assert c["spilled_segments"] == 1 and c["spill_puts"] == 1
    assert ky[7] not in a.tree.nodes and a.tree.nodes[ky[6]].owners == {B}
    assert a.stats.evicted_last_copies == 1  # ky[7] left the pool
    assert b.tree.nodes[ky[6]].value is not None and hops_of(b.tree.nodes[ky[6]]) == 1
    assert b.tree.nodes[ky[7]].value is None  # (B knew it only as A's)
    # a use at the receiver resets the count
    b.tree.used([b.tree.nodes[ky[6]]])
    assert hops_of(b.tree.nodes[ky[6]]) == 0
    for h in hosts.values():
        h.check()


def test_a_put_with_malformed_hops_is_refused_and_stores_nothing():
    net = FakeNet()
    hosts = make_pool(net, [A, B], capacity=32, heartbeat_interval=0.05)
    net.heartbeat()
    w = list(range(5000, 5008))
    kw = hosts[A].compute(w)
    kv = [kvio.gather(hosts[A].kv, _slots(hosts[A], k)).numpy() for k in kw]
    tok = segment_bytes(w, S)
    head = {"from": A, "keys": kw, "segs": [0, 1], "tokens": [tok[: S * 8], tok[S * 8 :]]}
    agent = hosts[A].pool.agent
    for bad in ([1], [1, -1], [1, "2"], 3):
        with pytest.raises(Exception, match="hops"):
            agent.request(B, "put", dict(head, hops=bad), kv).result()
    assert not any(n.value is not None for n in hosts[B].tree.nodes.values())
    assert agent.request(B, "put", dict(head, hops=[3, 0]), kv).result().header["held"] == [0, 1]
    n0, n1 = hosts[B].tree.nodes[kw[0]], hosts[B].tree.nodes[kw[1]]
    assert (hops_of(n0), n1.spilled) == (3, None)  # 0 hops: nothing recorded
    for h in hosts.values():
        h.check()


def test_a_copy_other_members_hold_is_not_spilled():
    net = FakeNet()
    hosts = _scene(net)
    a = hosts[A]
    ky = _keys(Y)
    a.tree.nodes[ky[7]].owners.add(B)  # B announced a copy of Y's last segment
    a.tree.nodes[ky[6]].owners.add(B)
    a.compute(Z)
    assert a.evicted == [ky[7], ky[6]]
    assert "spill_puts" not in a.pool.counters.snapshot()


def test_a_spilled_segment_keeps_its_age_at_the_receiver():
    """A put with ``age`` is placed in the receiver's LRU order as old as it was; without
    one it is the newest."""
    net = FakeNet()
    hosts = make_pool(net, [A, B], capacity=32, heartbeat_interval=0.05)
    net.heartbeat()
    b = hosts[B]
    b.compute(X[:24])  # 6 segments, 2 slots' worth of room left
    _poll(hosts)
    time.sleep(0.2)
    _poll(hosts)
    w = list(range(5000, 5008))
    kw = hosts[A].compute(w)  # 2 segments at A, sent to B by hand below
    tok = segment_bytes(w, S)
    kv = [kvio.gather(hosts[A].kv, _slots(hosts[A], k)).numpy() for k in kw]
    assert kv[0].nbytes == kv[1].nbytes == hosts[A].pool.transfers.seg_bytes
    agent = hosts[A].pool.agent
    head = {"from": A, "keys": kw, "segs": [0], "tokens": [tok[: S * 8]]}
    assert agent.request(B, "put", head, [kv[0]]).result().header["held"] == [0]
    old = dict(head, segs=[1], tokens=[tok[S * 8 :]], age=10.0)
    assert agent.request(B, "put", old, [kv[1]]).result().header["held"] == [1]
    # kw[1] is a leaf older than everything at B: the first to go; kw[0] (no age) last
    assert b.tree.nodes[kw[1]].last_access < min(n.last_access for n in b.tree.nodes.values()
                                                 if n.value is not None and n.key != kw[1])
    b.evict(S)
    assert b.evicted == [kw[1]]
    b.evict(6 * S)
    assert kw[0] not in b.evicted and b.tree.nodes[kw[0]].value is not None
    for bad in (-1.0, math.inf, "10"):
        with pytest.raises(Exception, match="age"):
            agent.request(B, "put", dict(old, age=bad), [kv[1]]).result()
    for h in hosts.values():
        h.check()


def test_spill_to_picks_the_oldest_data_beyond_the_margin():
    pol = PoolPolicy(PolicyConfig(spill_margin=2.0), S, {A: 1.0, B: 1.0, C: 1.0})
    assert pol.spill_to(1.0, {B: 3.0, C: 2.5}) == B
    assert pol.spill_to(1.0, {B: 2.0, C: 1.5}) is None  # 2.0 is not more than 2 x 1.0
    assert pol.spill_to(5.0, {B: math.inf, C: 30.0}) == B  # free room beats any age
    assert pol.spill_to(1.0, {C: 7.0, B: 7.0}) == B  # ties: the smallest id
    assert pol.spill_to(0.0, {}) is None
    off = PoolPolicy(PolicyConfig(), S, {A: 1.0, B: 1.0})  # off by default
    assert off.spill_to(0.0, {B: math.inf}) is None
    with pytest.raises(ValueError, match="spill_margin"):
        PolicyConfig(spill_margin=0.5)
    limited = PoolPolicy(PolicyConfig(spill_margin=2.0, spill_hops=2), S, {A: 1.0, B: 1.0})
    assert limited.spill_to(1.0, {B: 3.0}, hops=1) == B
    assert limited.spill_to(1.0, {B: 3.0}, hops=2) is None  # handed over twice since its use
    assert pol.spill_to(1.0, {B: 3.0}, hops=3) == B  # the default limit: 4
    assert pol.spill_to(1.0, {B: 3.0}, hops=4) is None
    unlimited = PoolPolicy(PolicyConfig(spill_margin=2.0, spill_hops=0), S, {A: 1.0, B: 1.0})
    assert unlimited.spill_to(1.0, {B: 3.0}, hops=1000) == B
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="spill_hops"):
            PolicyConfig(spill_hops=bad)


def test_chains_groups_segments_by_the_chain_they_lie_on():
    k = [11, 12, 13, 14]
    other = [11, 22]
    items = [(k[:4], "s3"), (k[:3], "s2"), (other, "u1"), (k[:1], "s0")]
    got = chains(items)
    assert got == [(k, {3: "s3", 2: "s2", 0: "s0"}), (other, {1: "u1"})]
    # a shallower segment first, then a deeper one on the same chain: the chain grows
    assert chains([(k[:2], "a"), (k, "b")]) == [(k, {1: "a", 3: "b"})]
