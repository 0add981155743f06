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
    get       KV of segments by key  -> buffers (one per segment) or "missing"
    put       a segment computed elsewhere, sent to its home with its tokens and KV
    lease     pin segments for a requester that will ship queries to them; unlease
    attend    queries of one layer -> partial attention output + LSE (remote.py)
    status    one worker's view (CLI)

A segment's homes are the rendezvous choice among live members (placement.py):
one, or more for hot segments (hotness.py). Copies a worker holds for segments
homed elsewhere are *transient*: first to evict, never announced. Index sync
lives in index_sync.py, puts and pulls in transfers.py, query shipping in
remote.py. Anything that fails (a dead owner, a timeout, a wrong buffer) makes
the request recompute: a pull is all or nothing.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future
from typing import Any, Optional

from sglang_tokenlake import kvio
from sglang_tokenlake.membership import Membership, MembershipEvents
from sglang_tokenlake.placement import homes
from sglang_tokenlake.sglang.index_sync import MAX_CHAIN, IndexSync, _int_list
from sglang_tokenlake.sglang.transfers import Transfers
from sglang_tokenlake.transport.broker import Request
from sglang_tokenlake.transport.peers import PeerAgent
from sglang_tokenlake.tree import SegmentNode

logger = logging.getLogger(__name__)


class PoolLink(IndexSync, Transfers):
    """Membership, placement, replicas and the broker handlers of one worker's pool."""

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
        self._migrating: set[int] = set()  # keys put to a new home, not yet acknowledged
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
        if not d and self.migrate(node):
            return  # the pool's only copy: designated here until its new home holds it
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

    # -- scheduler thread: reads ------------------------------------------------------

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


