"""The pool link of one worker: its cache joined to the other workers' caches.

Threads and what they may touch::

    scheduler thread   tree, KV allocator, KV pool writes   (all state changes)
    broker thread      reads: KV of local segments (under the slot mutex), membership
    peer agent thread  sockets to peers, heartbeats, request futures

Messages (see transport/frames.py for the wire format)::

    hello     membership heartbeat; reply carries the sender's view of the pool
    announce  "I hold these segments" (designated copies only), by key chain
    evicted   "I no longer hold these segments"
    sync      "send me your whole index": the answer replaces what we knew of you

Index events carry a per-sender sequence number, and heartbeats carry the
sender's latest. A receiver that sees a gap (an event it refused or missed,
or a member that joined or restarted) pulls the sender's whole index with
``sync``; so every worker converges on where every segment lives.
    get       KV of segments by key  -> buffers (one per segment) or "missing"
    put       a segment computed elsewhere, sent to its home with its tokens and KV
    lease     pin segments for a requester that will ship queries to them; unlease
    attend    queries of one layer -> partial attention output + LSE (remote.py)
    status    one worker's view (CLI)

A segment's home is the rendezvous choice among live members (placement.py);
copies a worker holds for segments homed elsewhere are *transient*: first to
evict, never announced. Anything that fails (a dead owner, a timeout, a wrong
buffer) makes the request recompute: a pull is all-or-nothing.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future
from typing import Any, Optional

import numpy as np
import torch

from sglang_tokenlake import kvio
from sglang_tokenlake.membership import Membership, MembershipEvents
from sglang_tokenlake.placement import homes
from sglang_tokenlake.transport.broker import Request
from sglang_tokenlake.transport.peers import PeerAgent
from sglang_tokenlake.tree import SegmentNode

logger = logging.getLogger(__name__)

MAX_CHAIN = 1 << 16  # segments in one announced chain or put


def _wire_tensor(buf: memoryview) -> torch.Tensor:
    """An aligned, writable uint8 tensor copy of a received buffer."""
    out = torch.empty(buf.nbytes, dtype=torch.uint8)
    out.numpy()[:] = np.frombuffer(buf, dtype=np.uint8)
    return out


class PoolLink:
    def __init__(self, cache: Any, config: Any, self_id: str, broker: Any) -> None:
        self.cache = cache
        self.tree = cache.tree
        self.config = config
        self.S = cache.segment_size
        self.self_id = self_id
        self.broker = broker
        self.kvcache = cache.token_to_kv_pool_allocator.get_kvcache()
        self.layout = kvio.layout_of(self.kvcache)
        self.seg_bytes = self.S * self.layout.bytes_per_token()
        self.boot = uuid.uuid4().hex[:12]
        self.membership = Membership(
            self_id, int(cache.token_to_kv_pool_allocator.size), self.boot,
            self.layout.fingerprint, peer_timeout=config.peer_timeout,
        )
        curve = None
        if config.curve_dir:
            from sglang_tokenlake.transport.auth import load_pool_keys

            pub, sec = load_pool_keys(config.curve_dir)
            curve = (pub, pub, sec)
        self.agent = PeerAgent(curve=curve, heartbeat_interval=config.heartbeat_interval,
                               on_tick=self._tick, max_inflight=config.max_inflight,
                               name=f"tokenlake-peers-{self_id}")
        self.slot_mutex = cache.slot_mutex  # held while tree slots are freed or read remotely
        self._pulls: dict[int, tuple[Future, int, float]] = {}  # key -> (future, index, started)
        self._announce: list[tuple[list[int], list[int]]] = []
        self._evicted: list[int] = []
        self._drop: set[SegmentNode] = set()
        self._seq = 0  # index events broadcast so far
        self._applied: dict[str, int] = {}  # peer -> last index event applied (scheduler thread)
        self._syncing: set[str] = set()
        self._membership_version = -1
        self._alive: dict[str, int] = {}
        self._suspects: dict[str, float] = {}  # owner -> until when we avoid it
        self.ship_ok = True  # query shipping possible here (set by the factory)
        from sglang_tokenlake.hotness import HeavyHitters, ReplicaPlanner

        self.hot = HeavyHitters(window=config.hot_window, k=64)
        self.planner = ReplicaPlanner(budget_tokens=0, segment_tokens=self.S)
        self.copies: dict[int, int] = {}  # key -> copies wanted (hot segments only)
        self._next_replan = 0.0
        self.counters: dict[str, int] = defaultdict(int)
        from sglang_tokenlake.sglang import remote

        self.remote = remote.RemoteAttention(self)
        remote.ENGINE = self.remote
        for peer in config.peer_list():
            if peer != self_id:
                self.membership.add_seed(peer)
                self.agent.connect(peer, peer)
        self.agent.start()

    # -- placement -----------------------------------------------------------------

    def alive(self) -> dict[str, int]:
        v = self.membership.version
        if v != self._membership_version:
            self._alive = self.membership.alive()
            self._membership_version = v
        return self._alive

    def designated(self, key: int) -> bool:
        """Is this worker one of the segment's homes (its primary, or a replica of a hot one)?"""
        members = self.alive()
        if len(members) == 1:
            return True
        return self.self_id in homes(key, members, self.copies.get(key, 1))

    def observe(self, keys: list[int]) -> None:
        """One request uses these segments (scheduler thread)."""
        for k in keys:
            self.hot.observe(k)

    def replan(self) -> None:
        """Recompute replica counts from the hotness estimate and re-designate local copies."""
        members = self.alive()
        if self.config.replica_budget <= 0 or len(members) <= 1:
            new: dict[int, int] = {}
        else:
            self.planner.budget_tokens = int(self.config.replica_budget * sum(members.values()))
            new = self.planner.plan(self.hot.hot(), len(members))
        changed = set(new) ^ set(self.copies) | {k for k in new if self.copies.get(k) != new[k]}
        self.copies = new
        for k in changed:
            node = self.tree.nodes.get(k)
            if node is not None and node.value is not None:
                self._redesignate(node)

    def _redesignate(self, node: SegmentNode) -> None:
        d = self.designated(node.key)
        if d == node.designated:
            return
        node.designated = d
        if d:
            self._announce.append(([x.key for x in self.tree.path_to(node)], [node.depth]))
        else:  # no longer one of its homes: first to evict, no longer announced
            self._evicted.append(node.key)
            if not self.config.transient_copies:
                self._drop.add(node)

    def home_of(self, key: int) -> str:
        return homes(key, self.alive(), 1)[0]

    def suspect(self, owner: str) -> None:
        """Avoid ``owner`` for a while: it failed a request (any thread)."""
        self._suspects[owner] = time.monotonic() + 2 * self.config.peer_timeout

    def usable(self, owner: str) -> bool:
        until = self._suspects.get(owner)
        if until is not None and time.monotonic() < until:
            return False
        return self.membership.is_alive(owner)

    # -- scheduler thread: events from the cache --------------------------------------

    def on_inserted(self, keys: list[int], out: Any) -> None:
        """After the cache inserted a chain: designate, announce, put transient copies home."""
        held: list[int] = []
        puts: dict[str, list[int]] = defaultdict(list)
        for i, (node, adopted) in enumerate(zip(out.path, out.adopted)):
            if not adopted:
                continue
            if self.designated(node.key):
                node.designated = True
                held.append(i)
            else:
                node.designated = False
                puts[self.home_of(node.key)].append(i)
        if held:
            self._announce.append((list(keys[: held[-1] + 1]), held))
        for home, idxs in puts.items():
            self._put(home, keys, out.path, idxs)

    def on_evicted(self, nodes: list[SegmentNode]) -> None:
        self._evicted.extend(n.key for n in nodes if n.designated)

    def _put(self, home: str, keys: list[int], path: list[SegmentNode], idxs: list[int]) -> None:
        bufs, toks = [], []
        for i in idxs:
            base, off = path[i].value
            bufs.append(kvio.gather(self.kvcache, base[off : off + self.S]).numpy())
            toks.append(path[i].tokens)
        header = {"from": self.self_id, "keys": list(keys[: idxs[-1] + 1]), "segs": idxs, "tokens": toks}
        fut = self.agent.request(home, "put", header, bufs, timeout=self.config.pull_timeout * 2)
        self.counters["put_segments"] += len(idxs)
        self.counters["put_bytes"] += sum(b.nbytes for b in bufs)
        nodes = [path[i] for i in idxs]

        def done(f: Future) -> None:
            if f.exception() is None and f.result().header.get("stored") is not None:
                self.cache.submit(lambda: self._put_acked(home, nodes))
            else:
                self.counters["put_failures"] += 1

        fut.add_done_callback(done)

    def _put_acked(self, home: str, nodes: list[SegmentNode]) -> None:
        for n in nodes:
            if n.parent is not None:
                n.owners.add(home)
                if not self.config.transient_copies:
                    self._drop.add(n)

    # -- scheduler thread: reads ------------------------------------------------------

    def remote_run(self, keys: list[int], raw: bytes, start: int) -> list[SegmentNode]:
        """The segments after the local prefix that live pool members can serve.

        A local node inside the run must hold the request's own tokens (``raw``,
        int64 bytes of the request's full segments); the run ends before one that
        does not (a key collision), exactly as a local match would.
        """
        if len(self.alive()) == 1:
            return []
        run = []
        step = self.S * 8
        for i, node in enumerate(self.tree.run_after(keys, start), start):
            if node.value is not None:
                if node.tokens != raw[i * step : (i + 1) * step]:
                    break
            elif not any(self.usable(o) for o in node.owners):
                break
            run.append(node)
        return run

    def choose_modes(self, run: list[SegmentNode], new_tokens: int, max_new_tokens: int,
                     q_heads: int) -> list[str]:
        """Per node of ``run``: 'local', 'ship', 'pull' or 'recompute' (by the dispatch rules)."""
        from sglang_tokenlake import dispatch

        mode = self.config.remote_mode
        if mode != "auto":
            return ["local" if n.value is not None else mode for n in run]
        if not self.ship_ok:
            return ["local" if n.value is not None else "pull" for n in run]
        lay = self.layout
        shape = dispatch.ModelShape(layers=lay.layers, q_heads=q_heads, kv_heads=lay.kv_heads,
                                    head_dim=lay.head_dim, dtype_bytes=lay.itemsize)
        locations = {n.key: ({self.self_id} if n.value is not None else
                             {o for o in n.owners if self.usable(o)}) for n in run}
        plan = dispatch.plan([n.key for n in run], locations, {}, executor=self.self_id,
                             new_tokens=new_tokens, expected_output_tokens=max_new_tokens,
                             segment_tokens=self.S, shape=shape)
        names = {dispatch.Mode.LOCAL: "local", dispatch.Mode.SHIP_QUERY: "ship",
                 dispatch.Mode.PULL_KV: "pull", dispatch.Mode.RECOMPUTE: "recompute"}
        modes = [names[a.mode] for a in plan]
        for m in modes:
            self.counters[f"planned_{m}_segments"] += 1
        return modes

    def owner_for(self, node: SegmentNode) -> Optional[str]:
        owners = [o for o in node.owners if self.usable(o)]
        if not owners:
            return None
        # Spread load over replicas: the rendezvous order among the owners.
        return homes(node.key, {o: 1 for o in owners}, 1)[0]

    def prefetch(self, run: list[SegmentNode]) -> None:
        by_owner: dict[str, list[int]] = defaultdict(list)
        for node in run:
            if node.value is not None or node.key in self._pulls:
                continue
            owner = self.owner_for(node)
            if owner is None:
                continue
            by_owner[owner].append(node.key)
        now = time.monotonic()
        for owner, ks in by_owner.items():
            fut = self.agent.request(owner, "get", {"from": self.self_id, "keys": ks},
                                     timeout=self.config.pull_timeout)
            for i, k in enumerate(ks):
                self._pulls[k] = (fut, i, now)
            self.counters["get_requests"] += 1

    def load_run(self, nodes: list[SegmentNode], tokens: list[bytes], deadline: float) -> bool:
        """Pull ``nodes`` into local slots (scheduler thread); all or nothing.

        ``tokens[i]`` are the request's own token bytes of ``nodes[i]``: the owner's
        copy must carry the same tokens, or the pull is refused.
        """
        need = [(n, t) for n, t in zip(nodes, tokens) if n.value is None]
        self.prefetch([n for n, _ in need])
        datas = []
        for n, want in need:
            entry = self._pulls.pop(n.key, None)
            if entry is None:
                self.counters["pull_failures"] += 1
                return False
            fut, i, _ = entry
            try:
                msg = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as e:
                self.counters["pull_failures"] += 1
                logger.info("TokenLake: pull of a segment failed (%s); recomputing", e)
                return False
            found, toks = msg.header.get("found"), msg.header.get("tokens")
            if not isinstance(found, list) or i >= len(found) or not found[i]:
                self.counters["pull_failures"] += 1
                return False
            j = sum(1 for f in found[:i] if f)
            if not isinstance(toks, list) or j >= len(toks) or toks[j] != want:
                self.counters["pull_token_mismatch"] += 1
                return False
            buf = msg.buffers[j] if j < len(msg.buffers) else None
            if buf is None or buf.nbytes != self.seg_bytes:
                self.counters["pull_failures"] += 1
                return False
            datas.append(buf)
        if not need:
            return True
        slots = self.cache.alloc_slots(len(need) * self.S)
        if slots is None:
            self.counters["pull_no_memory"] += 1
            return False
        for j, ((node, tok), buf) in enumerate(zip(need, datas)):
            seg = slots[j * self.S : (j + 1) * self.S]
            kvio.scatter(self.kvcache, seg, _wire_tensor(buf), self.layout)
            keys = [x.key for x in self.tree.path_to(node)]
            designated = self.designated(node.key)
            _, adopted = self.tree.adopt(keys, (slots, j * self.S), tok, designated=designated)
            assert adopted
            if designated:
                self._announce.append((keys, [len(keys) - 1]))
            elif not self.config.transient_copies:
                self._drop.add(node)
        self.counters["pulled_segments"] += len(need)
        self.counters["pulled_bytes"] += len(need) * self.seg_bytes
        return True

    # -- scheduler thread: periodic work ----------------------------------------------

    def poll(self) -> None:
        now = time.monotonic()
        if now >= self._next_replan:
            self._next_replan = now + 1.0
            self.replan()
        if self._announce:
            chains, self._announce = self._announce, []
            self._broadcast("announce", {"chains": [[k, h] for k, h in chains]})
        if self._evicted:
            keys, self._evicted = self._evicted, []
            self._broadcast("evicted", {"keys": keys})
        if self._drop:
            self._sweep_transient()
        if self._pulls:
            now = time.monotonic()
            for k, (fut, _, t0) in list(self._pulls.items()):
                if fut.done() and now - t0 > 30.0:
                    del self._pulls[k]  # prefetched but never used

    def _sweep_transient(self) -> None:
        ready = [n for n in self._drop if n.value is not None and n.lock_ref == 0 and n.owners
                 and not n.designated]
        if not ready:
            return
        self._drop.difference_update(ready)
        self.cache.drop_nodes(ready)

    def _broadcast(self, kind: str, header: dict[str, Any]) -> None:
        self._seq += 1
        header = {"from": self.self_id, "seq": self._seq, **header}
        for peer in self.alive():
            if peer != self.self_id:
                self.agent.request(peer, kind, header, timeout=self.config.peer_timeout)
        self.counters[f"{kind}_sent"] += 1

    def on_membership(self, ev: MembershipEvents) -> None:
        for peer in ev.left + ev.restarted:
            self.remote.drop_peer_leases(peer)
            n = self.tree.drop_owner(peer)
            logger.info("TokenLake: %s left the pool (%d segments forgotten)", peer, n)
        # Homes moved: re-designate local copies; announce what became ours.
        for node in list(self.tree.nodes.values()):
            if node.value is not None:
                self._redesignate(node)
        for peer in ev.joined + ev.restarted:
            logger.info("TokenLake: %s joined the pool", peer)
            self._applied.pop(peer, None)
            self.request_sync(peer)

    # -- index synchronisation (scheduler thread) ---------------------------------------

    def index_chains(self) -> list[list[list[int]]]:
        """Every designated local segment as ``[chain keys, [its index]]``."""
        chains = []
        for node in self.tree.nodes.values():
            if node.value is not None and node.designated:
                chains.append([[x.key for x in self.tree.path_to(node)], [node.depth]])
        return chains

    def request_sync(self, peer: str) -> None:
        if peer in self._syncing:
            return
        self._syncing.add(peer)
        fut = self.agent.request(peer, "sync", {"from": self.self_id},
                                 timeout=self.config.peer_timeout * 2)
        self.counters["sync_requests"] += 1

        def done(f: Future) -> None:
            if f.exception() is not None:
                self.cache.submit(lambda: self._syncing.discard(peer))
                return
            h = f.result().header
            self.cache.submit(lambda: self._apply_sync(peer, h))

        fut.add_done_callback(done)

    def _apply_sync(self, peer: str, h: dict[str, Any]) -> None:
        self._syncing.discard(peer)
        chains, seq = h.get("chains"), h.get("seq")
        if not _valid_chains(chains) or not isinstance(seq, int):
            self.counters["malformed"] += 1
            return
        self.tree.drop_owner(peer)
        for keys, held in chains:
            self.tree.add_owner_chain(keys, held, peer)
        self._applied[peer] = seq

    def _apply_event(self, peer: str, seq: Any, apply: Any) -> None:
        apply()
        last = self._applied.get(peer)
        if not isinstance(seq, int) or last is None or seq != last + 1:
            self.request_sync(peer)  # a gap: what we know of this peer may be stale
        if isinstance(seq, int) and (last is None or seq > last):
            self._applied[peer] = seq

    def _check_seq(self, peer: str, seq: Any) -> None:
        if isinstance(seq, int) and seq > self._applied.get(peer, -1):
            self.request_sync(peer)

    # -- agent thread: heartbeats -----------------------------------------------------

    def hello_header(self) -> dict[str, Any]:
        return {"from": self.self_id, "capacity": int(self.cache.token_to_kv_pool_allocator.size),
                "boot": self.boot, "layout": self.layout.fingerprint, "seq": self._seq,
                "members": [m for m, _ in self.alive().items()]}

    def _tick(self) -> None:
        for peer in self.membership.known():
            fut = self.agent.request(peer, "hello", self.hello_header(),
                                     timeout=self.config.peer_timeout)
            fut.add_done_callback(self._hello_reply)
        ev = self.membership.expire()
        if ev:
            self.cache.submit(lambda: self.on_membership(ev))

    def _hello_reply(self, fut: Future) -> None:
        if fut.exception() is not None:
            return
        self._seen(fut.result().header)

    def _seen(self, h: dict[str, Any]) -> None:
        peer = h.get("from")
        if not isinstance(peer, str):
            return
        try:
            ev = self.membership.seen(peer, int(h.get("capacity", 0)), str(h.get("boot", "")),
                                      h.get("layout"))
        except ValueError as e:
            logger.error("TokenLake: refusing %s", e)
            return
        for m in h.get("members", []) or []:
            if isinstance(m, str) and m != self.self_id and m not in self.membership.known():
                self.membership.add_seed(m)
                self.agent.connect(m, m)
        if ev:
            self.cache.submit(lambda: self.on_membership(ev))

    # -- broker thread: handlers --------------------------------------------------------

    def handlers(self) -> dict[str, Any]:
        return {"hello": self._on_hello, "announce": self._on_announce,
                "evicted": self._on_evicted, "get": self._on_get, "put": self._on_put,
                "sync": self._on_sync, "lease": self._on_lease, "unlease": self._on_unlease,
                "attend": self._on_attend}

    def _on_lease(self, req: Request) -> None:
        peer = self._known_sender(req)
        if peer is None:
            return
        lease, keys = req.msg.header.get("lease"), req.msg.header.get("keys")
        if not isinstance(lease, str) or not _int_list(keys) or len(keys) > MAX_CHAIN:
            self.counters["malformed"] += 1
            req.error("lease: needs a lease id and a list of keys")
            return

        def job() -> None:
            ok = self.remote.grant_lease(peer, lease, keys)
            self.counters["leases_granted" if ok else "leases_refused"] += 1
            req.reply("lease", {"ok": ok})

        self.cache.submit(job)

    def _on_unlease(self, req: Request) -> None:
        lease = req.msg.header.get("lease")
        if not isinstance(lease, str):
            self.counters["malformed"] += 1
            req.error("unlease: needs a lease id")
            return
        self.cache.submit(lambda: self.remote.drop_lease(lease))
        req.reply("ok")

    def _on_attend(self, req: Request) -> None:
        if self._known_sender(req) is None:
            return
        with self.slot_mutex:
            self.remote.serve_attend(req)

    def _known_sender(self, req: Request) -> Optional[str]:
        peer = req.msg.header.get("from")
        if not isinstance(peer, str) or not self.membership.is_alive(peer):
            self.counters["refused_unknown_peer"] += 1
            req.error(f"unknown peer {peer!r}: send hello first")
            return None
        return peer

    def _on_hello(self, req: Request) -> None:
        h = req.msg.header
        self._seen(h)
        peer, seq = h.get("from"), h.get("seq")
        if isinstance(peer, str) and self.membership.is_alive(peer):
            # Queued after the events this peer sent before the heartbeat, so a
            # gap here is real: some event was refused or lost.
            self.cache.submit(lambda: self._check_seq(peer, seq))
        req.reply("hello", self.hello_header())

    def _on_sync(self, req: Request) -> None:
        # Index metadata only (keys, no KV): answered to any authenticated caller.
        self.cache.submit(lambda: req.reply("index", {"seq": self._seq, "chains": self.index_chains()}))

    def _on_announce(self, req: Request) -> None:
        peer = self._known_sender(req)
        if peer is None:
            return
        chains = req.msg.header.get("chains")
        if not _valid_chains(chains):
            self.counters["malformed"] += 1
            req.error("announce: chains must be [[keys], [indices]] lists")
            return
        seq = req.msg.header.get("seq")
        self.cache.submit(lambda: self._apply_event(
            peer, seq, lambda: [self.tree.add_owner_chain(k, h, peer) for k, h in chains]))
        req.reply("ok")

    def _on_evicted(self, req: Request) -> None:
        peer = self._known_sender(req)
        if peer is None:
            return
        keys = req.msg.header.get("keys")
        if not _int_list(keys):
            self.counters["malformed"] += 1
            req.error("evicted: keys must be a list of integers")
            return
        seq = req.msg.header.get("seq")
        self.cache.submit(lambda: self._apply_event(
            peer, seq, lambda: self.tree.remove_owner_keys(keys, peer)))
        req.reply("ok")

    def _on_get(self, req: Request) -> None:
        keys = req.msg.header.get("keys")
        if self._known_sender(req) is None:
            return
        if not _int_list(keys) or len(keys) > MAX_CHAIN:
            self.counters["malformed"] += 1
            req.error("get: keys must be a list of integers")
            return
        found, toks, bufs = [], [], []
        with self.slot_mutex:
            for k in keys:
                node = self.tree.nodes.get(k)
                value = node.value if node is not None else None
                if value is None:
                    found.append(False)
                    continue
                base, off = value
                bufs.append(kvio.gather(self.kvcache, base[off : off + self.S]).numpy())
                toks.append(node.tokens)
                found.append(True)
        self.counters["served_segments"] += len(bufs)
        self.counters["served_bytes"] += sum(b.nbytes for b in bufs)
        req.reply("kv", {"found": found, "tokens": toks}, bufs)

    def _on_put(self, req: Request) -> None:
        if self._known_sender(req) is None:
            return
        h, bufs = req.msg.header, req.msg.buffers
        keys, segs, toks = h.get("keys"), h.get("segs"), h.get("tokens")
        ok = (
            _int_list(keys) and 0 < len(keys) <= MAX_CHAIN and _int_list(segs)
            and isinstance(toks, list) and len(toks) == len(segs) == len(bufs)
            and all(0 <= i < len(keys) for i in segs)
            and all(isinstance(t, bytes) and len(t) == self.S * 8 for t in toks)
            and all(b.nbytes == self.seg_bytes for b in bufs)
        )
        if not ok:
            self.counters["malformed"] += 1
            req.error("put: malformed segments (keys, segs, tokens and KV buffers must agree)")
            return
        datas = [_wire_tensor(b) for b in bufs]

        def job() -> None:
            stored = 0
            for i, tok, data in zip(segs, toks, datas):
                node = self.tree.nodes.get(keys[i])
                if node is not None and node.value is not None:
                    node.designated = True
                    continue
                slots = self.cache.alloc_slots(self.S)
                if slots is None:
                    break
                kvio.scatter(self.kvcache, slots, data, self.layout)
                self.tree.adopt(keys[: i + 1], (slots, 0), tok, designated=True)
                self._announce.append((list(keys[: i + 1]), [i]))
                stored += 1
            self.counters["stored_segments"] += stored
            req.reply("ok", {"stored": stored})

        self.cache.submit(job)

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        designated = sum(1 for n in self.tree.nodes.values() if n.value is not None and n.designated)
        by_owner: dict[str, int] = defaultdict(int)
        for n in self.tree.nodes.values():
            for o in n.owners:
                by_owner[o] += 1
        return {
            "self": self.self_id,
            "members": self.membership.snapshot(),
            "hot_segments": len(self.copies),
            "replicas_planned": sum(c - 1 for c in self.copies.values()),
            "designated_segments": designated,
            "transient_segments": self.tree.local_nodes - designated,
            "remote_segments_by_owner": dict(by_owner),
            "counters": {**self.counters, **{f"agent_{k}": v for k, v in self.agent.counters.items()}},
            "pid": os.getpid(),
        }

    def designated_keys(self) -> list[str]:
        return sorted(f"{n.key:016x}" for n in self.tree.nodes.values()
                      if n.value is not None and n.designated)

    def transient_keys(self) -> list[str]:
        return sorted(f"{n.key:016x}" for n in self.tree.nodes.values()
                      if n.value is not None and not n.designated)

    def close(self) -> None:
        self.agent.close()


def _int_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _valid_chains(chains: Any) -> bool:
    if not isinstance(chains, list) or len(chains) > MAX_CHAIN:
        return False
    for c in chains:
        if not (isinstance(c, list) and len(c) == 2 and _int_list(c[0]) and _int_list(c[1])):
            return False
        if len(c[0]) > MAX_CHAIN or any(not 0 <= i < len(c[0]) for i in c[1]):
            return False
    return True
