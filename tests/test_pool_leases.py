"""The lease lifecycle (sglang_tokenlake/pool/leases.py) with fake peers: granted without
the owner's scheduler, verified against the tokens, renewed by use, expired, released
reliably, ended by a flush; per-request state that never outlives its request.
"""

from __future__ import annotations

import pytest
import torch
from pool_fakes import FakeNet, make_pool
from test_pool_link import (
    A,
    B,
    S,
    _decode_pass,
    _match,
    _reference,
    _remote_setup,
    chain,
    check_all,
    fake_req,
)

from sglang_tokenlake.pool.leases import token_digest
from sglang_tokenlake.pool.requests import RequestTable
from sglang_tokenlake.transport.peers import PeerError


def _ship(hosts, tokens, keys, raw, req=None):
    a = hosts[A]
    req = req or fake_req(tokens)
    path, run, device = _match(a, keys, raw, tokens, req)
    loaded, _ = a.pool.transfers.load_back(req, run[-1], device, len(run) * S)
    assert loaded == len(run) * S
    return req, path + run


def _lease(a, owner, lease, keys, digests):
    return a.pool.agent.request(owner, "lease", {"from": a.pool.self_id, "lease": lease,
                                                 "keys": keys, "digests": digests})


def _clock(start=100.0):
    t = [start]
    return t, (lambda: t[0])


def test_a_lease_is_granted_while_the_owner_scheduler_is_busy_both_ways():
    """Two workers shipping to each other while both schedulers are busy: each lease
    is answered at once by the broker thread, and pinned when the owner's scheduler
    runs again (before that, nothing of the owner can be evicted)."""
    net = FakeNet()
    hosts = make_pool(net, [A, B], remote_mode="ship", transient_copies=False)
    net.heartbeat()
    a, b = hosts[A], hosts[B]
    t_a, t_b = list(range(100, 132)), list(range(500, 532))
    b.compute(t_a)  # A will ship to B for t_a, B to A for t_b
    a.compute(t_b)
    for h in hosts.values():
        h.pool.poll()
    a.held, b.held = [], []  # both schedulers busy from here on
    req_a, _ = _ship(hosts, t_a, *chain(t_a))
    assert a.pool.remote.plan_of(req_a) is not None, "A fell back: B's lease waited"
    keys_b, raw_b = chain(t_b)
    req_b = fake_req(t_b)
    path, run, device = _match(b, keys_b, raw_b, t_b, req_b)
    loaded, _ = b.pool.transfers.load_back(req_b, run[-1], device, len(run) * S)
    assert loaded == len(run) * S and b.pool.remote.plan_of(req_b) is not None
    shipped_at_b = [k for _, k in a.pool.remote.plan_of(req_a).owners[B]]
    assert all(b.tree.nodes[k].lock_ref == 0 for k in shipped_at_b)  # granted, not pinned
    b.run_held()
    a.run_held()
    b.evict(10**6)  # pins first: the leased segments survive
    assert all(b.tree.nodes[k].lock_ref > 0 and b.tree.nodes[k].value is not None
               for k in shipped_at_b)
    a.pool.forget(req_a)
    b.pool.forget(req_b)
    assert len(a.pool.remote.leases) == len(b.pool.remote.leases) == 1  # released, not yet ended
    a.pool.poll()  # each owner's scheduler ends what was released
    b.pool.poll()
    assert not a.pool.remote.leases and not b.pool.remote.leases
    check_all(hosts)


def test_a_lease_whose_tokens_differ_is_refused():
    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a, b = hosts[A], hosts[B]
    held = [k for k in keys if b.tree.nodes[k].value is not None][:2]
    good = [token_digest(b.tree.nodes[k].tokens) for k in held]
    bad = [good[0], token_digest(b"other tokens")]
    with pytest.raises(PeerError):
        _lease(a, B, "x" * 32, held, good[:1]).result()  # a digest per key
    refused = _lease(a, B, "l1", held, bad).result()
    assert refused.header["ok"] is False and "other tokens" in refused.header["reason"]
    assert b.pool.counters["lease_token_mismatch"] == 1 and not b.pool.remote.leases
    granted = _lease(a, B, "l2", held, good).result()
    assert granted.header["ok"] is True and "l2" in b.pool.remote.leases
    check_all(hosts)


def _attend(a, owner, lease, keys, sender=None):
    q = torch.zeros(1, 4, 8)
    h = {"from": sender or a.pool.self_id, "layer": 0, "scale": 1.0, "cap": 0.0,
         "dtype": "float32", "heads": 4, "dim": 8, "v_dim": 8, "reqs": [[lease, 1, keys]]}
    return a.pool.agent.request(owner, "attend", h, [q.view(torch.uint8).numpy().reshape(-1)])


def test_queries_may_touch_only_their_own_lease():
    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a, b = hosts[A], hosts[B]
    held = [k for k in keys if b.tree.nodes[k].value is not None]
    digests = [token_digest(b.tree.nodes[k].tokens) for k in held]
    assert _lease(a, B, "mine", held[:1], digests[:1]).result().header["ok"]
    assert _attend(a, B, "mine", held[:1]).result().kind == "partial"
    with pytest.raises(PeerError, match="outside the lease"):
        _attend(a, B, "mine", held[:2]).result()
    with pytest.raises(PeerError, match="no such lease"):
        _attend(a, B, "someone-elses", held[:1]).result()
    # B itself is a member too, but the lease is A's: its unlease from B changes nothing.
    b.pool.agent.request(B, "unlease", {"from": B, "lease": "mine"}).result()
    assert "mine" in b.pool.remote.leases
    check_all(hosts)


def test_an_unused_lease_expires_and_use_renews_it():
    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a, b = hosts[A], hosts[B]
    t, clock = _clock()
    b.pool.remote.leases.clock = clock
    req, nodes = _ship(hosts, tokens, keys, raw)
    shipped = [k for _, k in a.pool.remote.plan_of(req).owners[B]]
    b.pool.poll()  # pinned
    ttl = b.pool.config.lease_ttl
    t[0] += ttl * 0.75
    _decode_pass(a, req, nodes, tokens)  # a query renews the lease
    assert not req.is_retracted
    t[0] += ttl * 0.75
    assert b.pool.remote.leases.expire() == 0
    assert all(b.tree.nodes[k].lock_ref > 0 for k in shipped)
    t[0] += ttl + 1
    assert b.pool.remote.leases.expire() == 1  # its requester went quiet
    assert all(b.tree.nodes[k].lock_ref == 0 for k in shipped)
    assert b.pool.status()["leases"]["granted_to"] == {}
    _decode_pass(a, req, nodes, tokens)
    assert req.is_retracted  # its next query is refused: the request starts over
    a.pool.forget(req)
    check_all(hosts)


def test_a_lost_unlease_is_sent_again_until_the_owner_has_it():
    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a, b = hosts[A], hosts[B]
    req, _ = _ship(hosts, tokens, keys, raw)
    assert b.pool.status()["leases"]["granted_to"] == {A: 1}
    assert a.pool.status()["leases"]["held_at"] == {B: 1}
    lost = [2]

    def drop_unlease(peer, kind, h):
        if kind == "unlease" and lost[0] > 0:
            lost[0] -= 1
            return True
        return False

    net.dropped = drop_unlease
    t, clock = _clock()
    a.pool.remote.releases.clock = clock
    a.pool.forget(req)
    assert len(a.pool.remote.releases.waiting) == 1 and len(b.pool.remote.leases) == 1
    for _ in range(4):
        t[0] += 10.0
        a.pool.remote.releases.poll()
    b.pool.poll()
    assert not b.pool.remote.leases and not a.pool.remote.releases.waiting
    assert a.pool.counters["unleases_retried"] == 2
    check_all(hosts)


def test_flush_on_the_owner_ends_its_leases_and_the_requester_starts_over():
    """SGLang's flush_cache on the owner while a requester ships to it: the leases end
    without touching the new tree, the requester's next query is refused (its request
    is retracted, never a wrong token), its later unlease is harmless, and the owner
    asks its peers for their index again."""
    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a, b = hosts[A], hosts[B]
    req, nodes = _ship(hosts, tokens, keys, raw)
    q, o, _ = _decode_pass(a, req, nodes, tokens)
    assert not req.is_retracted
    assert torch.allclose(o.double(), _reference(q, tokens + [7], 1), atol=1e-5)
    b.pool.poll()  # pinned
    sent = len(net.sent)
    b.flush()
    assert not b.pool.remote.leases and b.tree.local_nodes == 0
    assert (B, A, "sync") in net.sent[sent:]
    _decode_pass(a, req, nodes, tokens)
    assert req.is_retracted
    a.pool.forget(req)  # unlease of a lease the owner no longer has
    b.pool.poll()
    assert b.tree.locked_nodes == 0 and b.tree.evictable_tokens == 0
    check_all(hosts)
    b.compute(list(range(900, 916)))  # the owner keeps working
    b.evict(10**6)
    check_all(hosts)


def test_a_lease_granted_after_admission_never_takes_the_room_an_eviction_needs():
    """The owner's scheduler admitted work counting on its evictable segments; a peer's
    lease granted meanwhile (broker thread) would pin them at the eviction. The lease is
    broken instead: the eviction frees what it must, the requester starts over."""
    net = FakeNet()
    hosts = make_pool(net, [A, B], remote_mode="ship", transient_copies=False,
                      placement="executor")
    net.heartbeat()
    a, b = hosts[A], hosts[B]
    tokens = list(range(100, 132))
    keys, raw = chain(tokens)
    b.compute(tokens)  # B keeps all 8 segments of A's prompt
    b.compute(list(range(700, 732)))  # and 8 others: B's 64 slots are full
    for h in hosts.values():
        h.pool.poll()
    assert not b.free and b.tree.evictable_tokens == 64
    b.held = []  # B's scheduler is busy: A's lease is granted, not pinned
    req, nodes = _ship(hosts, tokens, keys, raw)
    assert len(b.pool.remote.leases) == 1
    b.run_held()
    freed = b.evict(40)  # B needs 40 tokens; pinning the lease would leave only 32 evictable
    assert len(freed) * S >= 40 and len(b.free) >= 40
    assert b.pool.counters["leases_broken_for_room"] == 1
    assert b.tree.locked_nodes == 0
    _decode_pass(a, req, nodes, tokens)
    assert req.is_retracted  # refused, never a wrong token
    a.pool.forget(req)
    b.pool.poll()
    assert not b.pool.remote.leases
    check_all(hosts)


class _Req:
    """A request object as the scheduler has them (weak-referenceable, no value equality)."""

    def __init__(self, tokens):
        from types import SimpleNamespace

        self.full_untruncated_fill_ids = list(tokens)
        self.rid = "r"
        self.sampling_params = SimpleNamespace(max_new_tokens=8)
        self.kv = SimpleNamespace(req_pool_idx=0)
        self.is_retracted = False


def test_state_of_a_request_dropped_without_release_goes_and_its_leases_are_released():
    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a, b = hosts[A], hosts[B]
    req = _Req(tokens)
    _ship(hosts, tokens, keys, raw, req)
    assert len(b.pool.remote.leases) == 1 and len(a.pool.transfers._decisions) == 1
    del req  # aborted while waiting: no release ever comes
    a.pool._next_lease_check = 0.0
    a.pool.poll()
    b.pool.poll()
    assert len(a.pool.remote.plans) == 0 and len(a.pool.transfers._decisions) == 0
    assert not b.pool.remote.leases  # its lease was released
    check_all(hosts)


def test_a_request_table_entry_belongs_to_its_object_only():
    table: RequestTable[int] = RequestTable()
    r1 = _Req([1])
    table.set(r1, 7)
    assert table.get(r1) == 7 and r1 in table
    other = _Req([2])
    assert table.get(other) is None and table.pop(other) is None
    # Another object that reuses r1's id never sees r1's entry.
    table._entries[id(other)] = table._entries.pop(id(r1))
    assert table.get(other) is None
    assert table.sweep() == 0  # r1 is alive: nothing to sweep
    dropped = []
    t2: RequestTable[int] = RequestTable(dropped.append)
    t2.set(_Req([3]), 5)  # dies at once
    assert t2.sweep() == 1 and dropped == [5] and len(t2) == 0


class _SlowAttends:
    """The requester's agent, with every ``attend`` answered ``delay`` seconds late."""

    def __init__(self, agent, delay):
        self.agent, self.delay = agent, delay

    def __getattr__(self, name):
        return getattr(self.agent, name)

    def request(self, peer, kind, header=None, buffers=(), *, timeout=5.0, direct=False,
                bulk=False):
        # Answered on a timer thread, so through the agent whatever ``direct`` asks.
        import threading
        from concurrent.futures import Future

        inner = self.agent.request(peer, kind, header, buffers, timeout=timeout, bulk=bulk)
        if kind != "attend":
            return inner
        late: Future = Future()
        threading.Timer(self.delay, lambda: late.set_result(inner.result())).start()
        return late


def test_a_slow_owner_fails_the_request_within_one_budget_per_pass():
    """Each layer's answer comes 0.35 s late, within a 1 s timeout; over 4 layers the
    waits would add up to 1.4 s. The pass's budget (1 s) runs out at the third layer:
    the request fails there and starts over."""
    from types import SimpleNamespace

    from test_pool_link import DIM, Q_HEADS, _layer

    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a = hosts[A]
    req, nodes = _ship(hosts, tokens, keys, raw)
    eng = a.pool.remote
    eng.query_timeout = 1.0
    eng.agent = _SlowAttends(eng.agent, 0.35)
    n = len(tokens)
    for node in nodes:
        d = node.depth
        a.rows[0][d * S : (d + 1) * S] = (node.value[0][node.value[1] : node.value[1] + S]
                                          if node.value is not None else 0)
    fb = SimpleNamespace(req_pool_indices=torch.tensor([0]), seq_lens_cpu=torch.tensor([n]),
                         seq_lens=torch.tensor([n]), extend_seq_lens_cpu=[1])
    batch = SimpleNamespace(reqs=[req])
    eng.begin_forward(batch)
    layers_ok = []
    for layer_id in range(4):
        layer = _layer()
        layer.layer_id = layer_id % 2
        q = torch.randn(1, Q_HEADS * DIM)
        eng.replace_outputs(q, torch.zeros(1, Q_HEADS * DIM), layer, fb, decode=True,
                            apply_cap=False)
        layers_ok.append(not eng.plan_of(req).failed)
    eng.end_forward(batch)
    assert layers_ok == [True, True, False, False]
    assert req.is_retracted and a.pool.counters["ship_failures"] == 1
    a.pool.forget(req)


def test_a_lease_with_a_key_twice_or_too_many_keys_is_an_error():
    from sglang_tokenlake.pool.limits import MAX_MESSAGE_KEYS

    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a, b = hosts[A], hosts[B]
    k = next(k for k in keys if b.tree.nodes[k].value is not None)
    d = token_digest(b.tree.nodes[k].tokens)
    with pytest.raises(PeerError, match="twice"):
        _lease(a, B, "dup", [k, k], [d, d]).result()
    with pytest.raises(PeerError, match="exceed"):
        _lease(a, B, "big", list(range(MAX_MESSAGE_KEYS + 1)), [d]).result()
    assert not b.pool.remote.leases


def test_an_unlease_queues_no_scheduler_job():
    """Releasing is a mark on the broker thread, ended at the owner's next poll: a flood
    of unleases cannot grow the owner's scheduler queue."""
    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a, b = hosts[A], hosts[B]
    req, _ = _ship(hosts, tokens, keys, raw)
    b.pool.poll()  # pinned
    b.held = []  # the owner's scheduler is busy
    plan = a.pool.remote.plan_of(req)
    for _ in range(100):
        a.pool.agent.request(B, "unlease", {"from": A, "lease": plan.lease}).result()
    assert b.held == [] and len(b.pool.remote.leases) == 1
    with pytest.raises(PeerError, match="no such lease"):  # released: no more queries
        _attend(a, B, plan.lease, [k for _, k in plan.owners[B]]).result()
    b.run_held()
    b.pool.poll()
    assert not b.pool.remote.leases
    assert all(n.lock_ref == 0 for n in b.tree.nodes.values() if n.value is not None)
    a.pool.forget(req)
    check_all(hosts)
