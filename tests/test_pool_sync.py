"""Full index sync in bounded pages (sglang_tokenlake/pool/sync.py) with fake peers.

A large index (>= 10,000 segments) crosses in pages whose headers stay under the
wire limit; the requester ends with exactly the owner's designated key set; events
that arrive while a sync is in flight are re-applied on top of it; a lost page
leaves the old view intact and the sync is retried.
"""

from __future__ import annotations

import random

import msgpack
from pool_fakes import SEED, FakeNet, make_pool

from sglang_tokenlake.pool.sync import Pull, snapshot
from sglang_tokenlake.segments import keys_from_bytes, segment_bytes
from sglang_tokenlake.transport.frames import MAX_HEADER_BYTES, encode

S = 4
A, B = "w0:1", "w1:2"


def grow(host, n_docs, seg_per_doc, seed=0, shared=8):
    """Insert documents straight into ``host``'s tree (designated, fake slots): every
    document shares its first ``shared`` segments with the one before it."""
    rng = random.Random(seed)
    prev: list[int] = []
    made = []
    for d in range(n_docs):
        toks = prev[: shared * S] + [rng.randrange(1 << 30) for _ in range((seg_per_doc - shared) * S)]
        prev = toks
        raw = segment_bytes(toks, S)
        keys = keys_from_bytes(raw, S, SEED)
        # Every 5th segment is designated elsewhere: its record is an ancestor, not held.
        host.tree.insert(keys, raw, [("fake", i) for i in range(len(keys))],
                         designated=[(i + d) % 5 != 0 for i in range(len(keys))])
        made.append(keys)
    return made


def designated(host):
    return {k for k, n in host.tree.nodes.items() if n.value is not None and n.designated}


def known_of(host, owner):
    return {k for k, n in host.tree.nodes.items() if owner in n.owners}


def record_pages(link):
    """Wrap ``link``'s sync handler to record every page header's encoded size."""
    sizes = []
    inner = link.index.on_sync

    def on_sync(req):
        reply = req.reply

        def spy(kind, header=None, buffers=()):
            if kind == "index":
                sizes.append(len(encode(kind, req.msg.id, header)[0]))
            reply(kind, header, buffers)

        req.reply = spy
        inner(req)

    link.index.on_sync = on_sync
    return sizes


def test_a_large_index_syncs_in_pages_under_the_header_limit():
    net = FakeNet()
    hosts = make_pool(net, [A, B], segment_size=S)
    a, b = hosts[A], hosts[B]
    grow(a, 48, 256)
    want = designated(a)
    assert len(a.tree.nodes) >= 11_000 and len(want) >= 9_000
    # The whole index at the default page size is one page under the limit.
    snap = snapshot(a.tree, B, 0)
    ancestors = set()
    for k in want:
        n = a.tree.nodes[k]
        while n.parent is not None and n.key not in ancestors:
            ancestors.add(n.key)
            n = n.parent
    assert sorted(snap.keys) == sorted(ancestors)  # each node once
    assert len(msgpack.packb(snap.page("x", 0, a.pool.index.page_records))) < MAX_HEADER_BYTES
    # B knew something stale of A: it must be gone afterwards.
    b.tree.add_owner_chain([11, 12, 13], [2], A)
    a.pool.index.page_records = 700
    sizes = record_pages(a.pool)
    b.pool.index.request_sync(A)
    assert len(sizes) == -(-len(snap.keys) // 700) >= 17
    assert max(sizes) < MAX_HEADER_BYTES
    assert known_of(b, A) == want
    assert b.pool.index.entries(A) == len(want)
    for k in random.Random(1).sample(sorted(want), 200):  # same place in the tree
        assert ([x.key for x in b.tree.path_to(b.tree.nodes[k])]
                == [x.key for x in a.tree.path_to(a.tree.nodes[k])])
    assert 13 not in b.tree.nodes
    assert b.pool.counters["syncs_done"] == 1 and not b.pool.index._syncs
    assert len(a.pool.index.snapshots) == 0  # the last page freed the snapshot
    b.tree.check()


def test_events_that_arrive_during_a_sync_are_applied_on_top_of_it():
    net = FakeNet()
    hosts = make_pool(net, [A, B], segment_size=S)
    net.heartbeat()
    a, b = hosts[A], hosts[B]
    docs = grow(a, 6, 64)
    a.pool.index.page_records = 50
    inner = a.pool.index.on_sync
    calls = []

    def on_sync(req):
        calls.append(req.msg.header.get("cursor"))
        if len(calls) == 3:  # between pages: A's index changes, and A says so
            gone = [k for k in docs[2][20:40] if a.tree.nodes[k].designated]
            for k in gone:
                a.tree.set_designated(a.tree.nodes[k], False)
            a.pool.index.retract(gone)
            new = grow(a, 1, 30, seed=7, shared=0)[0]
            a.pool.index.announce(new, [i for i, k in enumerate(new) if a.tree.nodes[k].designated])
            a.pool.index.flush()
        inner(req)

    a.pool.index.on_sync = on_sync
    b.pool.index.drop_peer(A)
    b.pool.index.forget_peer(A)
    b.pool.index.request_sync(A)
    assert len(calls) > 3 and b.pool.counters["syncs_done"] >= 1
    assert known_of(b, A) == designated(a)
    # The snapshot predates the changes: the events were re-applied after it.
    assert b.pool.index._applied[A] == a.pool.index.seq
    b.tree.check()


def test_an_interrupted_sync_keeps_the_old_view_and_is_retried():
    net = FakeNet()
    hosts = make_pool(net, [A, B], segment_size=S)
    net.heartbeat()
    a, b = hosts[A], hosts[B]
    grow(a, 4, 64)
    a.pool.index.page_records = 40
    b.pool.index.request_sync(A)
    old = known_of(b, A)
    assert old == designated(a)
    grow(a, 2, 64, seed=3)  # A holds more now; B does not know yet
    a.pool.index.seq += 1  # (an event B missed)
    net.dropped = lambda peer, kind, h: kind == "sync" and h.get("cursor") == 80
    b.pool.index.request_sync(A)
    assert b.pool.counters["sync_failures"] == 1
    assert known_of(b, A) == old  # the pages that did arrive changed nothing
    assert not b.pool.index._syncs
    net.dropped = lambda peer, kind, h: False
    net.heartbeat(1)  # A's heartbeat: B's view of A is not current, so B syncs again
    assert known_of(b, A) == designated(a) != old
    b.tree.check()


def test_malformed_pages_are_refused():
    good = {"sync": "s", "seq": 3, "cursor": 0, "total": 3, "keys": [1, 2, 3],
            "parents": [-1, 1, 2], "held": b"\x01\x00\x01", "done": True}
    assert Pull().add(dict(good)) is None
    for bad in ({"parents": [-1, 3, 2]},  # a child before its parent
                {"keys": [1, 2, 2]},  # a key twice
                {"held": b"\x01\x02\x01"},
                {"total": 1 << 40},
                {"done": False},
                {"keys": [1, 2, -3]},
                {"cursor": 5},
                {"keys": [1, 2, 3, 4]}):
        assert Pull().add({**good, **bad}) is not None, bad
    p = Pull()
    assert p.add({**good, "total": 5, "done": False}) is None
    assert p.add({**good, "cursor": 3, "total": 5, "keys": [4, 5], "parents": [3, 9],
                  "held": b"\x01\x01"}) is not None  # parent 9 never came


def test_a_segment_retracted_then_announced_in_one_poll_stays_known():
    """Both events queued before one flush: the receivers must end up knowing the
    segment is held (the retraction must not be sent after the announcement)."""
    from pool_fakes import FakeNet, make_pool

    net = FakeNet()
    hosts = make_pool(net, ["w0:1", "w1:2"], segment_size=4)
    net.heartbeat()
    a, b = hosts["w0:1"], hosts["w1:2"]
    keys = a.compute(list(range(10, 42)))
    a.pool.poll()
    node = next(a.tree.nodes[k] for k in keys if a.tree.nodes[k].designated)
    assert "w0:1" in b.tree.nodes[node.key].owners
    a.pool.index.retract([node.key])
    a.pool.index.announce_node(node)
    a.pool.index.flush()
    assert "w0:1" in b.tree.nodes[node.key].owners
    a.pool.index.announce_node(node)
    a.pool.index.retract([node.key])  # the other order: retracted at the end
    a.pool.index.flush()
    assert b.tree.nodes.get(node.key) is None or "w0:1" not in b.tree.nodes[node.key].owners
