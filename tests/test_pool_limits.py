"""Bounds on what a peer can make a worker hold or do (sglang_tokenlake/pool/limits.py).

Each request over a bound is answered with an error, changes nothing in the
tree, and the worker keeps serving the next, valid request.
"""

from __future__ import annotations

import pytest
from pool_fakes import FakeNet, make_pool

import sglang_tokenlake.pool.index as index_mod
from sglang_tokenlake.membership import Membership
from sglang_tokenlake.pool.limits import (
    MAX_HELLO_MEMBERS,
    MAX_MESSAGE_KEYS,
    check_keys,
    max_frame_bytes,
    valid_member_id,
)
from sglang_tokenlake.transport.frames import MAX_HEADER_BYTES
from sglang_tokenlake.transport.peers import PeerError

S = 4
A, B = "w0:1", "w1:2"


@pytest.fixture
def pool():
    net = FakeNet()
    hosts = make_pool(net, [A, B], segment_size=S, placement_choices=1)
    net.heartbeat()
    return net, hosts


def send(hosts, kind, header, buffers=()):
    """A request from A to B; the reply, the error's text, or (not answered yet) None."""
    fut = hosts[A].pool.agent.request(B, kind, {"from": A, **header}, buffers)
    if not fut.done():
        return None
    try:
        return fut.result(0)
    except PeerError as e:
        return str(e)


def snapshot_of(host):
    return {k: (n.value is not None, frozenset(n.owners)) for k, n in host.tree.nodes.items()}


def still_serves(hosts):
    keys = hosts[B].compute(list(range(1000, 1016)))
    reply = send(hosts, "get", {"keys": keys})
    assert not isinstance(reply, str) and reply.kind == "kv"
    assert send(hosts, "hello", hosts[A].pool.hello_header()).kind == "hello"


def test_check_keys():
    assert check_keys([1, 2, (1 << 64) - 1]) is None
    assert "twice" in check_keys([1, 2, 1])
    assert "exceed" in check_keys(list(range(MAX_MESSAGE_KEYS + 1)))
    assert check_keys([1, -1]) is not None and check_keys([1, 1 << 64]) is not None
    assert check_keys([True]) is not None and check_keys("abc") is not None
    assert check_keys([]) is not None and check_keys([], nonempty=False) is None


def test_member_ids():
    assert valid_member_id("10.0.0.1:30001") and valid_member_id("host-a.example:1")
    for bad in ("", "host", ":1", "h:0", "h:70000", "h:1x", "a b:1", "h" * 300 + ":1", 5, None):
        assert not valid_member_id(bad), bad


def test_max_frame_bytes_admits_the_largest_legitimate_frame():
    assert max_frame_bytes(10, 1, 1) > MAX_HEADER_BYTES
    big = 256 * 80 * 2 * 8 * 128 * 2  # a 256-token segment of a 80-layer model
    assert max_frame_bytes(big, 64, 128) > big


@pytest.mark.parametrize("kind,header", [
    ("get", {"keys": list(range(1, MAX_MESSAGE_KEYS + 2))}),
    ("get", {"keys": [5, 6, 5]}),
    ("evicted", {"seq": 1, "keys": list(range(1, MAX_MESSAGE_KEYS + 2))}),
    ("evicted", {"seq": 1, "keys": [7, 7]}),
    ("announce", {"seq": 1, "chains": [[list(range(1, 40_001)), [0]],
                                       [list(range(50_001, 90_001)), [0]]]}),
    ("announce", {"seq": 1, "chains": [[[1, 2, 1], [2]]]}),
    ("announce", {"seq": 1, "chains": [[[1, 2, 3], [2, 2]]]}),
    ("announce", {"seq": 1, "chains": [[[1, 2, 3], [3]]]}),
    ("put", {"keys": [1, 1], "segs": [], "tokens": []}),
    ("sync", {"sync": "x" * 100}),
    ("sync", {"cursor": -1}),
])
def test_over_a_bound_is_an_error_and_changes_nothing(pool, kind, header):
    net, hosts = pool
    hosts[A].compute(list(range(32)))
    for h in hosts.values():
        h.pool.poll()
    before = snapshot_of(hosts[B])
    reply = send(hosts, kind, header)
    assert isinstance(reply, str), reply
    assert snapshot_of(hosts[B]) == before
    still_serves(hosts)


def test_a_hello_with_too_many_members_adds_none(pool):
    net, hosts = pool
    b = hosts[B].pool
    known = set(b.membership.known())
    h = {**hosts[A].pool.hello_header(), "members": [f"m{i}:1" for i in range(MAX_HELLO_MEMBERS + 1)]}
    assert send(hosts, "hello", h).kind == "hello"  # the heartbeat itself counts
    assert set(b.membership.known()) == known
    assert b.counters["refused_hello_members"] == 1
    h["members"] = ["ok:5", "bad member", 7, "x:99999", {"a": 1}]
    assert send(hosts, "hello", h).kind == "hello"
    assert set(b.membership.known()) == known | {"ok:5"}
    assert send(hosts, "hello", {**h, "from": "not a member"}).kind == "hello"
    assert b.counters["refused_hello"] == 1
    still_serves(hosts)


def test_learned_members_are_bounded():
    m = Membership("me:1", 10, "boot", "layout", max_members=3)
    assert m.add_seed("a:1") and m.add_seed("b:1")
    assert not m.add_seed("c:1") and m.add_seed("a:1")
    with pytest.raises(ValueError, match="members known"):
        m.seen("d:1", 1, "x", "layout")
    assert sorted(m.known()) == ["a:1", "b:1"]


def test_a_peer_may_index_only_so_many_segments_here(pool, monkeypatch):
    net, hosts = pool
    b = hosts[B]
    monkeypatch.setattr(index_mod, "MAX_REMOTE_ENTRIES", 5)
    before = snapshot_of(b)
    seq = hosts[A].pool.index.seq
    assert send(hosts, "announce", {"seq": seq + 1, "chains": [[[91, 92, 93], [0, 1, 2]]]}).kind == "ok"
    assert b.pool.index.entries(A) == 3
    ok_state = snapshot_of(b)
    assert ok_state != before
    # Three more would pass the bound of 5: refused, nothing added.
    send(hosts, "announce", {"seq": seq + 2, "chains": [[[94, 95, 96], [0, 1, 2]]]})
    assert b.pool.counters["refused_index_full"] == 1
    assert 94 not in b.tree.nodes
    # Retracting makes room again.
    send(hosts, "evicted", {"seq": seq + 3, "keys": [93]})
    assert b.pool.index.entries(A) == 2
    send(hosts, "announce", {"seq": seq + 4, "chains": [[[91, 92, 97], [2]]]})
    assert A in b.tree.nodes[97].owners


def test_a_busy_scheduler_refuses_work_beyond_the_queue_bound(pool):
    net, hosts = pool
    b = hosts[B]
    b.pool.index.jobs.limit = 3
    b.held = []  # B's scheduler is busy: jobs wait
    seq = hosts[A].pool.index.seq
    replies = [send(hosts, "announce", {"seq": seq + 1 + i, "chains": [[[300 + i], [0]]]})
               for i in range(5)]
    assert [isinstance(r, str) and "busy" in r for r in replies] == [False, False, False, True, True]
    assert b.pool.counters["refused_busy"] == 2
    assert b.pool.index.jobs.pending == 3
    b.run_held()
    assert b.pool.index.jobs.pending == 0
    assert all(A in b.tree.nodes[300 + i].owners for i in range(3))
    assert 303 not in b.tree.nodes
    still_serves(hosts)


def test_puts_beyond_the_queued_kv_bound_are_refused(pool):
    net, hosts = pool
    a, b = hosts[A], hosts[B]
    keys = a.compute(list(range(16)))
    tr = a.pool.transfers
    b.pool.transfers.puts.limit = tr.seg_bytes  # one segment's KV
    b.held = []

    def put(i):
        node = a.tree.nodes[keys[i]]
        base, off = node.value
        from sglang_tokenlake import kvio
        buf = kvio.gather(tr.kvcache, base[off : off + S]).numpy()
        return send(hosts, "put", {"keys": keys[: i + 1], "segs": [i], "tokens": [node.tokens]}, [buf])

    assert put(0) is None  # queued, waiting for B's scheduler
    second = put(1)
    assert isinstance(second, str) and "busy" in second
    assert b.pool.counters["refused_busy"] == 1
    b.run_held()
    assert b.pool.transfers.puts.pending == 0 and b.tree.nodes[keys[0]].value is not None
    b.held = []
    assert put(1) is None  # admitted again once the queue drained
    b.run_held()
    assert b.pool.counters["refused_busy"] == 1 and b.tree.nodes[keys[1]].value is not None


def test_a_chain_that_disagrees_with_the_tree_is_not_applied(pool):
    """A key names its whole prefix: a chain placing a known key elsewhere (a collision
    or a bogus message) would index one key at two nodes. Found by the fuzz test."""
    net, hosts = pool
    b = hosts[B]
    keys = b.compute(list(range(2000, 2016)))  # keys[1] sits under keys[0]
    seq = hosts[A].pool.index.seq
    before = snapshot_of(b)
    assert send(hosts, "announce", {"seq": seq + 1, "chains": [[[keys[1]], [0]],
                                                                [[77, 78], [0, 1]],
                                                                [[78], [0]]]}).kind == "ok"
    assert b.pool.counters["refused_chain_conflicts"] == 2
    after = snapshot_of(b)
    assert {k: v for k, v in after.items() if k not in (77, 78)} == before
    assert A in b.tree.nodes[78].owners and b.tree.nodes[78].parent is b.tree.nodes[77]
    b.tree.check()
    a = hosts[A]
    akeys = a.compute(list(range(3000, 3008)))
    node = a.tree.nodes[akeys[0]]
    base, off = node.value
    from sglang_tokenlake import kvio
    buf = kvio.gather(a.pool.transfers.kvcache, base[off : off + S]).numpy()
    reply = send(hosts, "put", {"keys": [keys[2], akeys[0]], "segs": [1], "tokens": [node.tokens]},
                 [buf])
    assert isinstance(reply, str)  # (refused by the key check or the chain check)
    b.check()
    still_serves(hosts)
