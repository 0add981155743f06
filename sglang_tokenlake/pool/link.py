"""The pool link of one worker: its cache joined to the other workers' caches.

Threads and what they may touch::

    scheduler thread   tree, KV allocator, KV pool writes   (all state changes)
    broker thread      reads: KV of local segments (under the slot mutex), membership
    peer agent thread  sockets to peers, heartbeats, request futures

Messages (see transport/frames.py for the wire format)::

    hello     membership heartbeat; carries the sender's capacity, eviction horizon,
              backlog, heavy hitters and KV stream port; the reply the receiver's
    announce  "I hold these segments" (designated copies only), by key chain   (index.py)
    evicted   "I no longer hold these segments"                                (index.py)
    sync      "send me your whole index": the answer replaces what we knew of you
    get       KV of segments by key  -> buffers (one per segment) or "missing" (transfers.py)
    put       a segment computed elsewhere, sent to its home with its tokens and KV
    lease     pin segments for a requester that will ship queries to them; unlease
    attend    queries of one layer -> partial attention output + LSE       (remote.py)
    status    one worker's view (CLI)

Every decision of policy goes through ``PoolPolicy`` (policy.py), the same code
the simulator runs: where a new segment is kept (two-choice homes by eviction
horizon; replicas of hot segments from the pool-wide heavy hitters merged from
every member's heartbeats), which copy may be evicted (pool-wide leaf-first),
and which replica serves a request in which mode (dispatch). Copies a worker
holds for segments homed elsewhere are *transient*: first to evict, never
announced. Anything that fails (a dead owner, a timeout, a wrong buffer) makes
the request recompute: a pull is all or nothing.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from bisect import bisect_left, bisect_right
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Optional

from sglang_tokenlake.config import TokenLakeConfig
from sglang_tokenlake.counters import Counters
from sglang_tokenlake.dispatch import Costs
from sglang_tokenlake.hotness import HotView, merge_shares, top_view
from sglang_tokenlake.membership import Membership, MembershipEvents
from sglang_tokenlake.policy import PoolPolicy
from sglang_tokenlake.pool.calibration import Calibration
from sglang_tokenlake.pool.identity import Identities
from sglang_tokenlake.pool.index import IndexSync
from sglang_tokenlake.pool.limits import beacon_of, hello_members, valid_member_id
from sglang_tokenlake.pool.remote import RemoteAttention
from sglang_tokenlake.pool.spill import Spill
from sglang_tokenlake.pool.surfaces import CacheHost
from sglang_tokenlake.pool.transfers import Transfers
from sglang_tokenlake.transport.auth import CurveKeys
from sglang_tokenlake.transport.broker import Request
from sglang_tokenlake.transport.peers import PeerAgent
from sglang_tokenlake.tree import InsertOutcome, SegmentNode

logger = logging.getLogger(__name__)


class PoolLink:
    """Membership, policy and the broker handlers of one worker's pool.

    Args:
        host: the worker's cache (see ``surfaces.CacheHost``).
        config: the worker's TokenLake settings.
        self_id: this worker's member id (its broker address ``host:port``).
        curve: CURVE keys for connections to peers, when the pool is authenticated.
        agent: the peer agent (tests pass a fake; by default a ``PeerAgent``).
    """

    def __init__(self, host: CacheHost, config: TokenLakeConfig, self_id: str, *,
                 curve: Optional[CurveKeys] = None, agent: Optional[PeerAgent] = None) -> None:
        self.host = host
        self.tree = host.tree
        self.config = config
        self.S = host.segment_size
        self.self_id = self_id
        self.counters = Counters()
        self.identities = Identities(curve, self.counters)  # 'from' bound to CURVE keys
        self.boot = uuid.uuid4().hex[:12]
        self.calibration = Calibration(Costs(), prefill_s_per_token=config.prefill_cost,
                                       rtt_s=config.link_rtt, bandwidth_Bps=config.link_bandwidth)
        self.policy = PoolPolicy(config.policy(), self.S, {self_id: float(host.capacity_tokens())},
                                 costs=self.calibration.costs())
        self.hot = config.policy().heavy_hitters()
        self.agent = agent if agent is not None else PeerAgent(
            curve=curve, heartbeat_interval=config.heartbeat_interval, on_tick=self._tick,
            max_inflight=config.max_inflight, name=f"tokenlake-peers-{self_id}")
        self.index = IndexSync(host, self.agent, self_id, self.alive, self.known_sender,
                               self.counters, config.peer_timeout)
        self.index.reconsider = self._redesignate_all
        self.transfers = Transfers(host, self, self.policy, self.index, self.agent, config,
                                   self.counters, self.known_sender, self.calibration)
        self.server = self.transfers.server
        self.spill = Spill(host, self, self.policy, self.agent, config, self.counters)
        self.layout = self.transfers.layout
        self.remote = RemoteAttention(host, self, self.agent, config.query_timeout, self.counters,
                                      config.lease_ttl)
        self.transfers.remote = self.remote
        self.remote.calibration = self.calibration
        self.membership = Membership(self_id, host.capacity_tokens(), self.boot,
                                     self.layout.fingerprint, peer_timeout=config.peer_timeout)
        self._membership_version = -1
        self._alive: dict[str, int] = {}
        self._suspects: dict[str, float] = {}  # owner -> until when we avoid it
        # What heartbeats carry, refreshed on the scheduler thread (read by the agent thread).
        self._beacon: dict[str, Any] = {"horizon": math.inf, "load": 0.0, "hot": [[], []],
                                        "observed": 0, "requests": 0}
        self._peer_state: dict[str, dict[str, Any]] = {}  # peer -> its last beacon
        self.kv_port = 0  # this worker's KV stream (transport/stream.py); 0: none
        self._requests = 0  # requests observed here
        self._planned_at = 0  # pool-wide requests at the last replica plan
        self._next_beacon = 0.0
        self._next_lease_check = 0.0
        self._clock_marks: deque[tuple[int, float]] = deque(maxlen=4096)  # (tree clock, time)
        for peer in config.peer_list():
            if peer != self_id:
                self.membership.add_seed(peer)
                self.agent.connect(peer, peer)
        if agent is None:
            self.agent.start()

    # -- members -------------------------------------------------------------------

    def alive(self) -> dict[str, int]:
        v = self.membership.version
        if v != self._membership_version:
            self._alive = self.membership.alive()
            self._membership_version = v
            self.policy.set_members({m: float(max(c, 1)) for m, c in self._alive.items()})
        return self._alive

    def suspect(self, owner: str) -> None:
        """Avoid ``owner`` for a while: it failed a request (any thread)."""
        self._suspects[owner] = time.monotonic() + 2 * self.config.peer_timeout

    def usable(self, owner: str) -> bool:
        until = self._suspects.get(owner)
        if until is not None and time.monotonic() < until:
            return False
        return self.membership.is_alive(owner)

    # -- policy inputs -----------------------------------------------------------------

    def horizon(self) -> float:
        """Seconds since this worker's least recently used evictable segment was used;
        ``inf`` while a new segment fits without evicting (scheduler thread)."""
        if self.host.free_tokens() >= self.S:
            return math.inf
        oldest = self.tree.oldest_access()
        return 0.0 if oldest is None else self.age_of(oldest)

    def age_of(self, clock: int) -> float:
        """Seconds since the tree clock read ``clock`` (from the first reading at or after it)."""
        marks = self._clock_marks
        i = bisect_left(marks, (clock, -math.inf))
        return time.monotonic() - marks[i][1] if i < len(marks) else 0.0

    def clock_at(self, age: float) -> int:
        """The tree clock ``age`` seconds ago: the last reading at or before then."""
        i = bisect_right(self._clock_marks, time.monotonic() - age, key=lambda m: m[1])
        return self._clock_marks[i - 1][0] if i else 0

    def horizons(self) -> dict[str, float]:
        out = {p: float(st.get("horizon", 0.0)) for p, st in self._peer_state.items()}
        out[self.self_id] = self._beacon["horizon"]
        return out

    def loads(self) -> dict[str, float]:
        out = {p: float(st.get("load", 0.0)) for p, st in self._peer_state.items()}
        out[self.self_id] = self._beacon["load"]
        return out

    def designated(self, node: SegmentNode, *, new_copy: bool = False) -> bool:
        """Should this worker's copy of ``node`` be one of the segment's designated copies?

        Among the policy's candidates holding it (usable owners, and this worker) the
        first ``copies`` in rendezvous order keep theirs (``PoolPolicy.keeps``). A
        ``new_copy`` (pulled here) is designated only while fewer than ``copies``
        candidates hold it: a pull never duplicates a home's copy.
        """
        if len(self.alive()) == 1:
            return True
        if new_copy:
            return self.policy.is_home(node.key, self.self_id) and not self.homes_hold(node)
        return self.policy.keeps(node.key, self.self_id, self._owners(node))

    def homes_hold(self, node: SegmentNode) -> bool:
        """Do enough of the segment's homes (other than this worker) hold it already?"""
        return self.policy.held_enough(node.key, self._owners(node))

    def _owners(self, node: SegmentNode) -> list[str]:
        return [m for m in node.owners if m != self.self_id and self.usable(m)]

    def targets_of(self, keys: list[int]) -> dict[int, str]:
        """The member each new copy of ``keys`` (one request's, root first) made here
        should be kept by (``PoolPolicy.place_run``)."""
        self.alive()
        runs = self.policy.place_run(keys, self.self_id, self.horizons())
        return {k: self.self_id if self.self_id in t else t[0] for k, t in runs.items()}

    def target_of(self, key: int) -> str:
        return self.targets_of([key])[key]

    def keep_copy(self, node: SegmentNode) -> bool:
        """The pool-wide leaf-first rule for a local leaf about to be evicted."""
        cached_children = any(c.owners for c in node.children.values())
        others = sum(1 for o in node.owners if self.usable(o))
        return self.policy.keep_last_copy(cached_children, others)

    def observe(self, keys: list[int]) -> None:
        """One request uses these segments (scheduler thread)."""
        self._requests += 1
        for k in keys:
            self.hot.observe(k)

    def replan(self) -> None:
        """Replica counts from the pool-wide hot view; re-designate local copies."""
        self.alive()
        views: list[HotView] = [top_view(self.hot, self.hot.k)]
        for st in self._peer_state.values():
            views.append(st["hot_view"])
        shares = merge_shares(views, self.hot.min_share)
        for k in self.policy.plan_replicas(shares):
            node = self.tree.nodes.get(k)
            if node is not None and node.value is not None:
                self._redesignate(node)

    def pool_requests(self) -> int:
        return self._requests + sum(int(st.get("requests", 0)) for st in self._peer_state.values())

    def _redesignate_all(self, nodes: list[SegmentNode]) -> None:
        for node in nodes:
            self._redesignate(node)

    def _redesignate(self, node: SegmentNode) -> None:
        d = self.designated(node)
        if d == node.designated:
            return
        if not d and self.transfers.migrate(node):
            return  # the pool's only copy: designated here until its new home holds it
        self.tree.set_designated(node, d)
        if d:
            self.index.announce_node(node)
        else:  # no longer one of its homes: first to evict, no longer announced
            self.index.retract([node.key])
            if not self.config.transient_copies:
                self.transfers.drop.add(node)

    # -- scheduler thread: events from the cache --------------------------------------

    def on_inserted(self, keys: list[int], out: InsertOutcome, seed: Optional[int] = None) -> None:
        """After the cache inserted a chain (``seed``: its namespace seed): designate, announce, put."""
        held: list[int] = []
        puts: dict[str, list[int]] = defaultdict(list)
        alone = len(self.alive()) == 1
        new: list[int] = []
        for i, (node, adopted) in enumerate(zip(out.path, out.adopted)):
            if not adopted:
                continue
            if alone:
                self.tree.set_designated(node, True)
                held.append(i)
            elif self.homes_hold(node):
                self.tree.set_designated(node, False)  # its homes hold it: a transient copy
                if not self.config.transient_copies:
                    self.transfers.drop.add(node)
            else:
                new.append(i)
        targets = self.targets_of([out.path[i].key for i in new]) if new else {}
        for i in new:
            node = out.path[i]
            self.tree.set_designated(node, targets[node.key] == self.self_id)
            if node.designated:
                held.append(i)
            else:
                puts[targets[node.key]].append(i)
        if held:
            self.index.announce(list(keys[: held[-1] + 1]), held)
        for home, idxs in puts.items():
            self.transfers._put(home, keys, out.path, idxs, seed=seed)

    def eviction_hooks(self) -> dict[str, Optional[Callable[[SegmentNode], Any]]]:
        return {"keep": self.keep_copy, "before_drop": self.spill.hook()}  # SegmentTree.evict's

    def on_evicted(self, nodes: list[SegmentNode]) -> None:
        self.index.retract([n.key for n in nodes if n.designated])
        self.spill.send()

    def forget(self, req: Any) -> Optional[tuple[int, int]]:
        """A request left: drop its decisions and leases; its (pulled, shipped) tokens."""
        self.remote.detach(req)
        return self.transfers.forget(req)

    # -- scheduler thread: periodic work ----------------------------------------------

    def before_free(self, need_tokens: int = 0) -> None:
        """Before anything frees slots (an eviction of ``need_tokens``, drops): pin the
        leases granted since, none that would leave less than that evictable."""
        self.remote.leases.settle(need_tokens)

    def flush(self, reset_tree: Callable[[], None]) -> None:
        """Flush the cache (scheduler thread): retract what this worker held, replace
        its tree with ``reset_tree`` and end the leases granted on the old one under
        the slot mutex, then ``on_flush``. The caller frees every slot."""
        self.on_evicted([n for n in self.tree.nodes.values() if n.value is not None])
        with self.host.slot_mutex:
            reset_tree()
            self.remote.leases.end_all()
        self.on_flush()

    def on_flush(self) -> None:
        """After a flush: requesters' next queries are refused (their requests start
        over), pending work on old nodes is dropped, peers' indexes are synced again."""
        self.remote.end_all()
        self.transfers.reset()
        self.index.reset()
        self.counters.add("flushes")
        for peer in self.alive():
            if peer != self.self_id:
                self.index.forget_peer(peer)
                self.index.request_sync(peer)

    def poll(self) -> None:
        self.remote.leases.settle()
        now = time.monotonic()
        tick = self.tree.clock
        if not self._clock_marks or (tick != self._clock_marks[-1][0]
                                     and now - self._clock_marks[-1][1] >= 0.05):
            self._clock_marks.append((tick, now))
        if now >= self._next_beacon:
            self._next_beacon = now + min(self.config.heartbeat_interval, 0.5)
            self._refresh_beacon()
        requests = self.pool_requests()
        if requests - self._planned_at >= self.config.replan_every:
            self._planned_at = requests
            self.replan()
        self.index.flush()
        if self.transfers.drop:
            self.transfers.sweep_transient()
        self.transfers.tick(now)
        if now >= self._next_lease_check:
            self._next_lease_check = now + 1.0
            self.remote.leases.expire()
            # Requests dropped without a release (aborted while waiting): their
            # decisions go, their leases are released.
            self.transfers.sweep_requests()
            self.remote.plans.sweep()
        self.remote.releases.poll()

    def _refresh_beacon(self) -> None:
        keys, counts = [], []
        view, observed = top_view(self.hot, self.hot.k)
        for k, c in view.items():
            keys.append(k)
            counts.append(c)
        load = self.host.queued_tokens() * self.calibration.prefill_s_per_token()
        self._beacon = {"horizon": self.horizon(), "load": load, "hot": [keys, counts],
                        "observed": observed, "requests": self._requests}

    def on_membership(self, ev: MembershipEvents) -> None:
        for peer in ev.left + ev.restarted:
            self.agent.set_stream(peer, None)  # until its next heartbeat names its port
            self.remote.leases.drop_peer(peer)
            self._peer_state.pop(peer, None)
            self.calibration.forget(peer)
            n = self.index.drop_peer(peer)
            logger.info("TokenLake: %s left the pool (%d segments forgotten)", peer, n)
        # Homes moved: re-designate local copies; announce what became ours.
        self.alive()
        self._redesignate_all([n for n in self.tree.nodes.values() if n.value is not None])
        for peer in ev.joined + ev.restarted:
            logger.info("TokenLake: %s joined the pool", peer)
            self.index.forget_peer(peer)
            self.index.request_sync(peer)

    # -- agent thread: heartbeats -----------------------------------------------------

    def hello_header(self) -> dict[str, Any]:
        return {"from": self.self_id, "capacity": int(self.host.capacity_tokens()),
                "boot": self.boot, "layout": self.layout.fingerprint, "seq": self.index.seq,
                "members": list(self.membership.alive()), "kv_port": self.kv_port, **self._beacon}

    def _tick(self) -> None:
        header = self.hello_header()
        sent = time.monotonic()
        for peer in self.membership.known():
            fut = self.agent.request(peer, "hello", header, timeout=self.config.peer_timeout)
            fut.add_done_callback(lambda f, p=peer: self._hello_reply(f, p, sent))
        ev = self.membership.expire()
        if ev:
            self.host.submit(lambda: self.on_membership(ev))

    def _hello_reply(self, fut: Future, peer: str, sent: float) -> None:
        if fut.exception() is not None:
            return
        self.calibration.observe_rtt(peer, time.monotonic() - sent)
        self._seen(fut.result().header, asked=peer)

    def _seen(self, h: dict[str, Any], asked: Optional[str] = None) -> None:
        peer = h.get("from")  # a heartbeat's answer must come from the member asked
        if not valid_member_id(peer) or (asked is not None and peer != asked):
            self.counters.add("refused_hello")
            return
        try:
            ev = self.membership.seen(peer, int(h.get("capacity", 0)), str(h.get("boot", ""))[:64],
                                      h.get("layout"))
        except (TypeError, ValueError, OverflowError) as e:
            self.counters.add("refused_hello")
            logger.error("TokenLake: refusing %s", e)
            return
        state = beacon_of(h, self.hot.k)
        if state is not None:
            self._peer_state[peer] = state
            self.agent.set_stream(peer, state["kv_port"])
        members = hello_members(h.get("members"), self.counters)
        known = set(self.membership.known())
        for m in members:
            if (valid_member_id(m) and m != self.self_id and m not in known
                    and self.identities.may_join(m)):
                if not self.membership.add_seed(m):
                    self.counters.add("refused_members")
                    break
                known.add(m)
                self.agent.connect(m, m)
        if ev:
            self.host.submit(lambda: self.on_membership(ev))

    # -- broker thread: handlers --------------------------------------------------------

    def handlers(self) -> dict[str, Callable[[Request], None]]:
        return self.identities.guard({  # with CURVE: 'from' must match the key
            "hello": self._on_hello, "get": self.server.on_get, "put": self.server.on_put,
            **self.remote.handlers(self.known_sender), **self.index.handlers()})

    def stream_handlers(self) -> dict[str, Callable[[Request], None]]:
        """What the KV stream serves (transport/stream.py): pulls."""
        return self.identities.guard({"get": self.server.on_get})

    def known_sender(self, req: Request) -> Optional[str]:
        peer = req.msg.header.get("from")
        if not isinstance(peer, str) or not self.membership.is_alive(peer):
            self.counters.add("refused_unknown_peer")
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
            # Skipped when the scheduler is backed up: the next heartbeat checks again.
            self.index.jobs.submit(lambda: self.index.check_seq(peer, seq))
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
            "hot_segments": len(self.policy.copies),
            "replicas_planned": sum(c - 1 for c in self.policy.copies.values()),
            "pool_requests": self.pool_requests(),
            "horizons": {m: (h if math.isfinite(h) else None) for m, h in self.horizons().items()},
            "loads": self.loads(),
            "designated_segments": designated,
            "transient_segments": self.tree.local_nodes - designated,
            "remote_segments_by_owner": dict(by_owner),
            "calibration": self.calibration.snapshot(),
            "leases": {"granted_to": self.remote.leases.by_peer(),
                       "held_at": self.remote.held_at(),
                       "unleases_waiting": len(self.remote.releases.waiting)},
            "counters": {**self.counters, **{f"agent_{k}": v for k, v in self.agent.counters.items()}},
            "pid": os.getpid(),
        }

    def designated_keys(self, designated: bool = True) -> list[str]:
        """Keys of the local copies that are designated (or, with False, transient)."""
        return sorted(f"{n.key:016x}" for n in self.tree.nodes.values()
                      if n.value is not None and n.designated == designated)

    def close(self) -> None:
        self.agent.close()

