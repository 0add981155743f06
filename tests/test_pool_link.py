"""The live pool's objects (sglang_tokenlake/pool/) with a fake KV memory and fake peers.

No SGLang, no sockets: ``pool_fakes`` joins PoolLinks in one process. Each test
checks the slot accounting of every worker against an independent count.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from pool_fakes import DIM, KV_HEADS, Q_HEADS, SEED, FakeNet, kv_of, make_pool

from sglang_tokenlake.dispatch import Mode
from sglang_tokenlake.segments import keys_from_bytes, segment_bytes

S = 4
A, B, C = "w0:1", "w1:2", "w2:3"


def designated_holders(hosts, key):
    return sorted(w for w, h in hosts.items()
                  if (n := h.tree.nodes.get(key)) is not None and n.value is not None and n.designated)


def check_all(hosts):
    for h in hosts.values():
        h.check()


def chain(tokens):
    raw = segment_bytes(tokens, S)
    return keys_from_bytes(raw, S, SEED), raw


def fake_req(tokens, max_new=8):
    return SimpleNamespace(full_untruncated_fill_ids=list(tokens), rid="r",
                           sampling_params=SimpleNamespace(max_new_tokens=max_new),
                           kv=SimpleNamespace(req_pool_idx=0), is_retracted=False)


# -- designation -------------------------------------------------------------------------


def test_each_segment_is_designated_once_at_one_of_its_homes():
    net = FakeNet()
    hosts = make_pool(net, [A, B, C], placement="segment")
    net.heartbeat()
    keys = hosts[A].compute(list(range(48)))
    for h in hosts.values():
        h.pool.poll()
    pol = hosts[A].pool.policy
    for k in keys:
        holders = designated_holders(hosts, k)
        assert len(holders) == 1, (k, holders)
        # nothing is under pressure: the first rendezvous home keeps it
        assert holders == [pol.placement.home(k)]
        for w, h in hosts.items():  # every worker's index knows where it is
            n = h.tree.nodes[k]
            assert n.value is not None or holders[0] in n.owners, (w, k)
    assert {w for k in keys for w in designated_holders(hosts, k)} == {A, B, C}
    check_all(hosts)


def test_two_choice_placement_follows_the_announced_horizons():
    net = FakeNet()
    hosts = make_pool(net, [A, B, C], capacity=24, placement_choices=2, placement="segment")
    net.heartbeat()
    pol = hosts[A].pool.policy
    # B's memory is taken by running requests (horizon 0); the others have room (inf).
    running = hosts[B].alloc_slots(24)
    for h in hosts.values():
        h.pool._refresh_beacon()
    net.heartbeat(1)
    assert hosts[A].pool.horizons()[B] == 0.0
    assert math.isinf(hosts[A].pool.horizons()[C])
    keys = hosts[A].compute(list(range(24)))
    for h in hosts.values():
        h.pool.poll()
    moved_off_b = 0
    for k in keys:
        cands = pol.placement.homes(k, 2)
        holders = designated_holders(hosts, k)
        assert len(holders) == 1
        if cands[0] == B:  # B's first choice loses to the roomier second candidate
            assert holders == [cands[1]]
            moved_off_b += 1
        else:
            assert holders == [cands[0]]
    assert moved_off_b > 0
    hosts[B].free.extend(running.tolist())
    check_all(hosts)


def test_a_joining_member_gets_its_segments_handed_over():
    net = FakeNet()
    # segment placement, one choice: with 2 choices (or executor placement) A may keep it
    hosts = make_pool(net, [A, B], placement_choices=1, placement="segment")
    net.down.add(B)
    net.heartbeat()  # A alone: a pool of one holds everything
    keys = hosts[A].compute(list(range(64)))
    hosts[A].pool.poll()
    assert all(designated_holders(hosts, k) == [A] for k in keys)
    net.down.clear()
    net.heartbeat()  # B joins: segments homed at B are put there
    for h in hosts.values():
        h.pool.poll()
    pol = hosts[A].pool.policy
    homed_b = [k for k in keys if pol.placement.home(k) == B]
    assert homed_b and len(homed_b) < len(keys)
    for k in keys:
        assert designated_holders(hosts, k) == [pol.placement.home(k)], k
    # A keeps its old copies of B's segments only as transient copies
    for k in homed_b:
        n = hosts[A].tree.nodes[k]
        assert n.value is None or not n.designated
    check_all(hosts)


def test_executor_placement_keeps_a_computed_chain_where_it_was_computed():
    net = FakeNet()
    hosts = make_pool(net, [A, B, C], placement="executor")
    net.heartbeat()
    keys = hosts[B].compute(list(range(48)))
    for h in hosts.values():
        h.pool.poll()
    for k in keys:  # the whole chain stays at B, announced to the others, nothing is sent
        assert designated_holders(hosts, k) == [B], k
        for w in (A, C):
            assert B in hosts[w].tree.nodes[k].owners
    assert all(h.pool.counters.get("put_segments", 0) == 0 for h in hosts.values())
    # A recomputes the chain while B holds it: A's copy is transient, not a second home.
    hosts[A].compute(list(range(48)))
    for h in hosts.values():
        h.pool.poll()
    assert all(designated_holders(hosts, k) == [B] for k in keys)
    assert hosts[A].pool.designated_keys(False) == sorted(f"{k:016x}" for k in keys)
    check_all(hosts)


def test_two_workers_that_computed_one_chain_at_once_agree_on_one_home():
    net = FakeNet()
    # (without spilling: A's evicted copies stay out of B, which has room for them)
    hosts = make_pool(net, [A, B, C], placement="executor", spill_margin=0)
    net.heartbeat()
    tokens = list(range(200, 248))
    keys = hosts[A].compute(tokens)
    hosts[C].compute(tokens)  # before either announced: both keep it designated
    assert all(designated_holders(hosts, k) == [A, C] for k in keys)
    for _ in range(2):
        for h in hosts.values():
            h.pool.poll()
    pol = hosts[A].pool.policy
    for k in keys:  # the holder ranked first for the key keeps it; the other retracted
        first = next(m for m in pol.placement.homes(k, 3) if m in (A, C))
        assert designated_holders(hosts, k) == [first], k
        assert hosts[B].tree.nodes[k].owners == {first}
    assert {designated_holders(hosts, k)[0] for k in keys} == {A, C}
    # A evicts: where its copy was the home, C's transient copy becomes the home.
    kept_by_a = {k for k in keys if designated_holders(hosts, k) == [A]}
    gone = {n.key for n in hosts[A].evict(len(keys) * S)}
    for _ in range(2):
        for h in hosts.values():
            h.pool.poll()
    assert gone & kept_by_a
    for k in keys:
        assert designated_holders(hosts, k) == ([C] if k in gone or k not in kept_by_a else [A]), k
        assert hosts[B].tree.nodes[k].owners == set(designated_holders(hosts, k))
    check_all(hosts)


# -- remote runs: plan and load-back ------------------------------------------------------


def _remote_setup(mode: str):
    net = FakeNet()
    # segment placement: B's prompt is spread over both (A serves part of it locally)
    hosts = make_pool(net, [A, B], remote_mode=mode, transient_copies=False,
                      placement="segment")
    net.heartbeat()
    tokens = list(range(100, 132))  # 8 segments
    hosts[B].compute(tokens)
    for h in hosts.values():
        h.pool.poll()
    keys, raw = chain(tokens)
    return net, hosts, tokens, keys, raw


def _match(host, keys, raw, tokens, req):
    path = host.tree.match(keys, raw)
    run = host.pool.transfers.remote_run(keys, raw, len(path))
    run = host.pool.transfers.plan_run(req, len(tokens) + 1, len(path), run)
    device = path[-1] if path else host.tree.root
    return path, run, device


def test_pull_brings_the_whole_run_in_and_honours_the_plan():
    net, hosts, tokens, keys, raw = _remote_setup("pull")
    a = hosts[A]
    req = fake_req(tokens)
    path, run, device = _match(a, keys, raw, tokens, req)
    assert len(path) + len(run) == len(keys)
    remote = [n for n in run if n.value is None]
    assert remote, "some segments are held by B only"
    decided = a.pool.transfers._decisions.get(req)[1]
    assert all(d.mode is Mode.PULL_KV and d.worker == B for d, n in zip(decided, run)
               if n.value is None)
    free_before = a.free_tokens()
    loaded, last = a.pool.transfers.load_back(req, run[-1], device, len(run) * S)
    assert loaded == len(run) * S and last is run[-1]
    assert a.free_tokens() == free_before - len(remote) * S
    for n in remote:  # the pulled KV is B's, byte for byte
        base, off = n.value
        k_ref, v_ref = kv_of(tokens[: (n.depth + 1) * S], 1)
        assert torch.equal(a.kv.k_buffer[1][base[off : off + S]], k_ref[n.depth * S :])
        assert torch.equal(a.kv.v_buffer[1][base[off : off + S]], v_ref[n.depth * S :])
    assert a.pool.counters["pulled_segments"] == len(remote)
    for n in remote:  # B, a home, holds it: the pulled copy is a transient duplicate
        assert not a.tree.nodes[n.key].designated
        assert designated_holders(hosts, n.key) == [B]
    # released, the request reports what was pulled for it (the request log's figures)
    assert a.pool.forget(req) == (len(remote) * S, 0)
    assert a.pool.forget(req) is None
    check_all(hosts)


@pytest.mark.parametrize("mode", ["pull", "ship"])
def test_segments_served_to_a_peer_are_as_recent_at_their_owner_as_a_local_hit(mode):
    # B computes X, then Y; A's request uses X from B (pulled or shipped to). X is now
    # B's most recently used chain: B, short of room, evicts Y, not the pool's hot X.
    net = FakeNet()
    hosts = make_pool(net, [A, B], remote_mode=mode, transient_copies=False)
    net.heartbeat()
    a, b = hosts[A], hosts[B]
    x_tokens = list(range(100, 132))
    x = b.compute(x_tokens)
    y = b.compute(list(range(500, 532)))
    for h in hosts.values():
        h.pool.poll()
    req = fake_req(x_tokens)
    path, run, device = _match(a, *chain(x_tokens), x_tokens, req)
    assert not path and len(run) == len(x)
    loaded, _ = a.pool.transfers.load_back(req, run[-1], device, len(run) * S)
    assert loaded == len(x) * S
    b.pool.poll()  # B's scheduler: marks what it served, pins what it leased
    served = len(x) * S
    assert a.pool.forget(req) == ((served, 0) if mode == "pull" else (0, served))
    for h in hosts.values():
        h.pool.poll()
    gone = {n.key for n in b.evict(len(y) * S)}
    assert gone == set(y)
    assert all(b.tree.nodes[k].value is not None for k in x)
    check_all(hosts)


def test_a_failed_pull_commits_nothing():
    net, hosts, tokens, keys, raw = _remote_setup("pull")
    a = hosts[A]
    req = fake_req(tokens)
    path, run, device = _match(a, keys, raw, tokens, req)
    assert [n for n in run if n.value is None]
    # The owner does not answer: nothing may be committed, the request recomputes.
    net.dropped = lambda peer, kind, h: kind == "get"
    a.pool.transfers._pulls.clear()
    free_before, local_before = a.free_tokens(), a.tree.local_nodes
    loaded, last = a.pool.transfers.load_back(req, run[-1], device, len(run) * S)
    assert (loaded, last) == (0, device)
    assert a.free_tokens() == free_before and a.tree.local_nodes == local_before
    assert a.stats.pull_fallbacks == 1
    assert a.pool.forget(req) is None  # nothing was served to it from the pool
    c = a.pool.counters
    assert (c["pull_failures"], c["pull_not_found"], c["pull_errors"]) == (1, 0, 1)
    assert c["pull_deferrals"] == 0
    check_all(hosts)


def test_a_pull_that_finds_segments_gone_waits_then_loads_what_is_left():
    from sglang_tokenlake.pool.transfers import MAX_DEFERRALS

    net, hosts, tokens, keys, raw = _remote_setup("pull")
    a, b = hosts[A], hosts[B]
    req = fake_req(tokens)
    path, run, device = _match(a, keys, raw, tokens, req)
    remote = [n for n in run if n.value is None]
    assert len(remote) >= 2
    # The owner lost the last remote segment after the plan (its eviction notice not
    # yet here): nothing is committed, the index forgets that copy, the request waits.
    a.pool.transfers._pulls.clear()
    victim = remote[-1].key
    b.drop_nodes([b.tree.nodes[victim]])
    free_before, local_before = a.free_tokens(), a.tree.local_nodes
    assert a.pool.transfers.load_back(req, run[-1], device, len(run) * S) is None
    assert a.free_tokens() == free_before and a.tree.local_nodes == local_before
    c = a.pool.counters
    assert (c["pull_failures"], c["pull_not_found"], c["pull_deferrals"]) == (1, 1, 1)
    assert a.stats.pull_fallbacks == 0
    node = a.tree.nodes.get(victim)
    assert node is None or B not in node.owners
    check_all(hosts)
    # Matched again at a later round: the run stops before the lost segment and loads.
    path2, run2, device2 = _match(a, keys, raw, tokens, req)
    assert len(path2) + len(run2) == keys.index(victim)
    loaded, last = a.pool.transfers.load_back(req, run2[-1], device2, len(run2) * S)
    assert loaded == len(run2) * S and last is run2[-1]
    assert all(a.tree.nodes[n.key].value is not None for n in run2)
    check_all(hosts)
    # A request deferred MAX_DEFERRALS times already recomputes instead of waiting again.
    other = fake_req(tokens)
    a.pool.transfers._deferrals.set(other, MAX_DEFERRALS)
    a.pool.transfers.missing = [(B, keys[0])]
    assert not a.pool.transfers._defer(other)
    assert c["pull_deferrals"] == 1
    check_all(hosts)


def test_a_pull_of_the_wrong_tokens_is_refused():
    net, hosts, tokens, keys, raw = _remote_setup("pull")
    a, b = hosts[A], hosts[B]
    req = fake_req(tokens)
    path, run, device = _match(a, keys, raw, tokens, req)
    a.pool.transfers._pulls.clear()
    remote = [n for n in run if n.value is None]
    b.tree.nodes[remote[0].key].tokens = b"\x00" * (8 * S)  # a key collision at the owner
    loaded, _ = a.pool.transfers.load_back(req, run[-1], device, len(run) * S)
    assert loaded == 0
    assert a.pool.counters["pull_token_mismatch"] == 1
    b.tree.nodes[remote[0].key].tokens = segment_bytes(tokens, S)[remote[0].depth * S * 8:
                                                                  (remote[0].depth + 1) * S * 8]
    check_all(hosts)


# -- leases and query shipping -------------------------------------------------------------


def _layer():
    return SimpleNamespace(tp_q_head_num=Q_HEADS, qk_head_dim=DIM, v_head_dim=DIM, layer_id=1,
                           scaling=DIM ** -0.5, logit_cap=0.0)


def _reference(q, tokens, layer):
    """float64 attention of one decode query over the KV of ``tokens``."""
    k, v = kv_of(tokens, layer)
    g = Q_HEADS // KV_HEADS
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("hd,thd->ht", q.double(), k) * DIM ** -0.5
    return torch.einsum("ht,thd->hd", torch.softmax(s, dim=-1), v)


def _shipped(mode="ship"):
    net, hosts, tokens, keys, raw = _remote_setup(mode)
    a = hosts[A]
    req = fake_req(tokens)
    path, run, device = _match(a, keys, raw, tokens, req)
    loaded, last = a.pool.transfers.load_back(req, run[-1], device, len(run) * S)
    assert loaded == len(run) * S
    return net, hosts, tokens, req, path + run


def test_ship_leases_the_owners_segments_until_the_request_leaves():
    net, hosts, tokens, req, nodes = _shipped()
    a, b = hosts[A], hosts[B]
    plan = a.pool.remote.plan_of(req)
    assert plan is not None
    shipped = [k for _, k in plan.owners[B]]
    assert shipped == [n.key for n in nodes if n.value is None]
    assert a.free_tokens() == a.capacity - a.tree.cached_tokens  # no slot for shipped segments
    assert len(b.pool.remote.leases) == 1
    # The lease left on the scheduler thread's own socket (no hand-off to the agent thread).
    assert a.pool.agent.counters["direct_sent"] == 1
    assert [k for w, _, k in net.sent if w == A and k == "lease"] == ["lease"]
    b.evict(10**6)  # leased segments survive any eviction (pinned before it)
    assert all(b.tree.nodes[k].lock_ref > 0 for k in shipped)
    assert all(b.tree.nodes[k].value is not None for k in shipped)
    a.pool.forget(req)  # the request finished: unlease
    b.pool.poll()  # the owner's scheduler ends the released lease
    assert not b.pool.remote.leases
    assert all(b.tree.nodes[k].lock_ref == 0 for k in shipped)
    check_all(hosts)


def _decode_pass(a, req, nodes, tokens):
    """One decode step of ``req`` on worker A: row, new token's KV, hooks."""
    n = len(tokens)
    row = a.rows[0]
    for node in nodes:
        d = node.depth
        row[d * S : (d + 1) * S] = node.value[0][node.value[1] : node.value[1] + S] \
            if node.value is not None else 0
    new_slot = a.alloc_slots(1)
    row[n] = int(new_slot[0])
    k, v = kv_of(tokens + [7], 1)
    a.kv.k_buffer[1][new_slot] = k[n:]
    a.kv.v_buffer[1][new_slot] = v[n:]
    q = torch.randn(1, Q_HEADS, DIM, generator=torch.Generator().manual_seed(5))
    o = torch.zeros(1, Q_HEADS * DIM)
    fb = SimpleNamespace(req_pool_indices=torch.tensor([0]), seq_lens_cpu=torch.tensor([n + 1]),
                         seq_lens=torch.tensor([n + 1]), extend_seq_lens_cpu=[1])
    batch = SimpleNamespace(reqs=[req])
    eng = a.pool.remote
    eng.begin_forward(batch)
    eng.replace_outputs(q.reshape(1, -1), o, _layer(), fb, decode=True, apply_cap=False)
    eng.end_forward(batch)
    a.free.extend(new_slot.tolist())
    return q[0], o.view(Q_HEADS, DIM), batch


def test_shipped_attention_merges_to_full_attention():
    net, hosts, tokens, req, nodes = _shipped()
    a = hosts[A]
    assert any(n.value is None for n in nodes) and any(n.value is not None for n in nodes)
    q, o, _ = _decode_pass(a, req, nodes, tokens)
    ref = _reference(q, tokens + [7], 1)
    assert torch.allclose(o.double(), ref, atol=1e-5), (o.double() - ref).abs().max()
    assert not req.is_retracted and a.pool.counters["query_bytes"] > 0
    a.pool.forget(req)
    check_all(hosts)


def test_an_owner_that_fails_mid_pass_retracts_the_request():
    net, hosts, tokens, req, nodes = _shipped()
    a = hosts[A]
    net.down.add(B)
    _, _, batch = _decode_pass(a, req, nodes, tokens)
    assert req.is_retracted
    assert [r for b_, r in a.pool.remote.pending_retract if b_ is batch] == [req]
    assert a.pool.counters["ship_failures"] == 1
    assert not a.pool.usable(B)  # suspected: the retried request will not ship to it
    net.down.clear()
    a.pool.forget(req)
    check_all(hosts)


def test_a_refused_lease_falls_back_to_pulling():
    net, hosts, tokens, keys, raw = _remote_setup("ship")
    a, b = hosts[A], hosts[B]
    req = fake_req(tokens)
    path, run, device = _match(a, keys, raw, tokens, req)
    net.dropped = lambda peer, kind, h: kind == "lease"
    remote = [n for n in run if n.value is None]
    loaded, _ = a.pool.transfers.load_back(req, run[-1], device, len(run) * S)
    assert loaded == len(run) * S
    assert a.pool.remote.plan_of(req) is None
    assert all(a.tree.nodes[n.key].value is not None for n in remote)  # pulled instead
    assert not b.pool.remote.leases
    check_all(hosts)


# -- index sync ----------------------------------------------------------------------------


def test_a_lost_announcement_is_repaired_by_a_full_sync():
    net = FakeNet()
    hosts = make_pool(net, [A, B], placement_choices=1)
    net.heartbeat()
    lost = []

    def drop_second_announce(peer, kind, h):
        if kind == "announce" and h["seq"] == 2:
            lost.append(h)
            return True
        return False

    net.dropped = drop_second_announce
    all_keys = []
    for base in (0, 100, 200):
        all_keys += hosts[A].compute(list(range(base, base + 16)))
        hosts[A].pool.poll()
    assert lost, "the second announcement was dropped"
    mine = [k for k in all_keys if designated_holders(hosts, k) == [A]]
    b = hosts[B]
    # The third event revealed the gap; B re-synced A's whole index.
    assert b.pool.counters["sync_requests"] >= 1
    assert all(A in b.tree.nodes[k].owners for k in mine)
    check_all(hosts)


def test_a_heartbeat_reveals_a_lost_last_event():
    net = FakeNet()
    hosts = make_pool(net, [A, B], placement_choices=1)
    net.heartbeat()
    net.dropped = lambda peer, kind, h: kind == "announce"
    keys = hosts[A].compute(list(range(16)))
    hosts[A].pool.poll()
    mine = [k for k in keys if designated_holders(hosts, k) == [A]]
    assert mine and not any(A in hosts[B].tree.nodes.get(k, SimpleNamespace(owners=())).owners
                            for k in mine)
    net.dropped = lambda peer, kind, h: False
    net.heartbeat(1)  # A's seq is ahead of what B applied: B syncs
    assert all(A in hosts[B].tree.nodes[k].owners for k in mine)


# -- pool-wide hotness and eviction -----------------------------------------------------------


def test_replicas_are_planned_from_the_pool_wide_hot_view():
    net = FakeNet()
    hosts = make_pool(net, [A, B, C], replica_budget=0.5, replan_every=1, hot_k=16)
    net.heartbeat()
    keys = hosts[A].compute(list(range(16)))
    hot = keys[0]
    for _ in range(50):  # only A sees the accesses
        hosts[A].pool.observe([hot])
    hosts[A].pool._refresh_beacon()
    net.heartbeat(1)
    b = hosts[B].pool
    assert b._peer_state[A]["hot_view"][0][hot] == 50
    b.replan()
    assert b.policy.copies.get(hot, 1) > 1, "B plans replicas from A's accesses"
    hosts[A].pool.replan()
    assert hosts[A].pool.policy.copies == b.policy.copies  # one merged view, one plan


def _find(pol, n_segs, homes_wanted, start):
    for base in range(start, start + 100000, 16):
        keys, _ = chain(list(range(base, base + n_segs * S)))
        if [pol.placement.home(k) for k in keys] == homes_wanted:
            return base, keys
    pytest.fail("no such chain")


@pytest.mark.parametrize("leaf_first", [True, False])
def test_pool_wide_leaf_first_keeps_the_last_copy_of_a_parent(leaf_first):
    net = FakeNet()
    hosts = make_pool(net, [A, B], placement_choices=1, transient_copies=False,
                      pool_leaf_first=leaf_first, placement="segment")
    net.heartbeat()
    a = hosts[A]
    pol = a.pool.policy
    base_p, (parent, child) = _find(pol, 2, [A, B], 0)
    base_u, (unrelated,) = _find(pol, 1, [A], 50000)
    a.compute(list(range(base_p, base_p + 2 * S)))  # older: parent at A, child put to B
    a.compute(list(range(base_u, base_u + S)))  # newer: a lone segment at A
    for h in hosts.values():
        h.pool.poll()
    assert a.tree.nodes[child].value is None and a.tree.nodes[child].owners == {B}
    assert a.tree.nodes[parent].value is not None and a.tree.nodes[parent].designated
    a.evict(S)
    if leaf_first:  # the parent is the pool's last copy of a cached prefix: the newer one goes
        assert a.evicted == [unrelated]
        assert a.tree.nodes[parent].value is not None
    else:  # plain LRU: the older parent goes, stranding B's child
        assert a.evicted == [parent]
    a.evict(S)  # with nothing else left, the kept copy goes too
    assert sorted(a.evicted) == sorted([unrelated, parent])
    check_all(hosts)


def test_a_pass_that_bypasses_the_attention_hook_commits_nothing():
    net, hosts, tokens, req, nodes = _shipped()
    a = hosts[A]
    batch = SimpleNamespace(reqs=[req])
    eng = a.pool.remote
    eng.begin_forward(batch)  # ... the model runs, but no attention hook is called ...
    eng.end_forward(batch)
    assert req.is_retracted
    assert a.pool.counters["ship_unhooked_passes"] == 1
    a.pool.forget(req)
    check_all(hosts)


def test_a_waiting_request_matched_again_keeps_its_decision(monkeypatch):
    # SGLang matches a waiting request at every scheduling round: the second match
    # reuses the decision and starts no second pull; another request, or the same
    # one after PLAN_REUSE_S, is planned afresh.
    from sglang_tokenlake.pool import transfers

    net, hosts, tokens, keys, raw = _remote_setup("pull")
    a = hosts[A]
    req = fake_req(tokens)
    _match(a, keys, raw, tokens, req)
    first = a.pool.transfers._decisions.get(req)
    gets = sum(1 for _, _, kind in net.sent if kind == "get")
    assert gets >= 1
    _match(a, keys, raw, tokens, req)
    assert a.pool.transfers._decisions.get(req) is first
    assert a.pool.counters["plans_reused"] == 1
    assert sum(1 for _, _, kind in net.sent if kind == "get") == gets
    other = fake_req(tokens)
    _match(a, keys, raw, tokens, other)
    assert a.pool.transfers._decisions.get(other) is not first
    monkeypatch.setattr(transfers, "PLAN_REUSE_S", 0.0)
    _match(a, keys, raw, tokens, req)
    assert a.pool.transfers._decisions.get(req) is not first
    assert a.pool.counters["plans_reused"] == 1
    a.pool.forget(req)
    a.pool.forget(other)
