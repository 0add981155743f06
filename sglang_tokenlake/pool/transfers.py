"""Moving segments between workers: puts to a segment's home, pulls into local slots.

Writes: a full segment computed on a worker that is not its home is put there
(asynchronously; the local copy is transient). Reads: the segments after a
request's local prefix that live members hold form its remote run; each is
shipped to (queries, remote.py), pulled (KV, here) or recomputed, as the
dispatch rules say. A pull is all or nothing; anything that fails makes the
request recompute. Peers' GETs and PUTs are served by ``kvserve.SegmentServer``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Optional

from sglang_tokenlake import kvio
from sglang_tokenlake.config import TokenLakeConfig
from sglang_tokenlake.counters import Counters
from sglang_tokenlake.dispatch import Assignment, Mode, ModelShape, pull_pressure
from sglang_tokenlake.placement import homes
from sglang_tokenlake.policy import PoolPolicy
from sglang_tokenlake.pool.calibration import Calibration
from sglang_tokenlake.pool.index import IndexSync
from sglang_tokenlake.pool.kvserve import SegmentServer, wire_tensor
from sglang_tokenlake.pool.leases import token_digest
from sglang_tokenlake.pool.limits import int_list, max_frame_bytes
from sglang_tokenlake.pool.requests import RequestTable
from sglang_tokenlake.pool.surfaces import CacheHost, PoolView
from sglang_tokenlake.segments import segment_bytes
from sglang_tokenlake.transport.broker import Request
from sglang_tokenlake.transport.peers import PeerAgent
from sglang_tokenlake.transport.stream import MAX_REPLY_BYTES
from sglang_tokenlake.tree import SegmentNode

if TYPE_CHECKING:
    from sglang_tokenlake.pool.remote import RemoteAttention

logger = logging.getLogger(__name__)


DECODE_STEPS_CAP = 256  # decode steps a request is expected to ship queries for, at most
PLAN_REUSE_S = 0.5  # a waiting request matched again within this keeps its dispatch decision
MAX_DEFERRALS = 2  # admissions of one request deferred after pulls found segments gone


class Transfers:
    """Puts, pulls and the choice of replica and mode per remote segment.

    Args:
        host: the worker's cache.
        view: members, homes and loads (the ``PoolLink``).
        policy: the pool's policy (dispatch).
        index: announces what this worker comes to hold as a home.
        agent: requests to peers.
        config: the worker's TokenLake settings.
        counters: the pool's counters.
        known_sender: the sender of a request if it is a live member, else None.
        calibration: measured costs for dispatch's time model (priors by default).
    """

    def __init__(self, host: CacheHost, view: PoolView, policy: PoolPolicy, index: IndexSync,
                 agent: PeerAgent, config: TokenLakeConfig, counters: Counters,
                 known_sender: Callable[[Request], Optional[str]],
                 calibration: Optional[Calibration] = None) -> None:
        self.host = host
        self.known_sender = known_sender
        self.tree = host.tree
        self.view = view
        self.policy = policy
        self.index = index
        self.agent = agent
        self.config = config
        self.counters = counters
        self.self_id = view.self_id
        self.server = SegmentServer(host, index, counters, known_sender,  # peers' gets, puts
                                    view.clock_at)
        self.puts = self.server.puts  # KV bytes queued by peers' puts
        self.S = host.segment_size
        self.kvcache, self.layout = self.server.kvcache, self.server.layout
        self.seg_bytes = self.server.seg_bytes
        self.remote: Optional[RemoteAttention] = None  # set by the link
        self.calibration = calibration or Calibration()
        self.calibration.layers = self.layout.layers
        self.ship_ok = True  # query shipping possible on this worker (set by the adapter)
        # key -> (future, index in its reply, started, owner asked)
        self._pulls: dict[int, tuple[Future, int, float, str]] = {}
        self.missing: list[tuple[str, int]] = []  # (owner, key) a pull found gone
        self._deferrals: RequestTable[int] = RequestTable()  # req -> admissions deferred
        self._served: RequestTable[tuple[int, int]] = RequestTable()  # req -> (pulled, shipped)
        self._migrating: set[int] = set()  # keys put to a new home, not yet acknowledged
        self._decisions: RequestTable[tuple[tuple[int, ...], list[Assignment], float]] = RequestTable()
        self.drop: set[SegmentNode] = set()  # transient copies to drop once unlocked
        # The largest frame a peer legitimately sends here (the broker's MAXMSGSIZE).
        self.max_frame_bytes = max_frame_bytes(self.seg_bytes, host.q_heads, self.layout.head_dim)

    def _put(self, home: str, keys: list[int], path: list[SegmentNode], idxs: list[int],
             migrate: bool = False, seed: Optional[int] = None) -> None:
        """Send segments ``path[i]`` (i in ``idxs``; chain ``keys``) to their home.

        Only the segments the home reports holding become its copies here; with
        ``migrate`` (a sole copy whose home moved) the local copy stays designated
        until then.
        """
        bufs, toks = [], []
        for i in idxs:
            base, off = path[i].value
            bufs.append(kvio.gather(self.kvcache, base[off : off + self.S]).numpy())
            toks.append(path[i].tokens)
        header = {"from": self.self_id, "keys": list(keys[: idxs[-1] + 1]), "segs": idxs, "tokens": toks}
        if seed is not None:  # lets the home check the first segment's key too
            header["seed"] = seed
        fut = self.agent.request(home, "put", header, bufs, timeout=self.config.pull_timeout * 2)
        self.counters.add("put_segments", len(idxs))
        self.counters.add("put_bytes", sum(b.nbytes for b in bufs))
        nodes = {i: path[i] for i in idxs}

        def done(f: Future) -> None:
            held = f.result().header.get("held") if f.exception() is None else None
            held = set(held) if int_list(held) else set()
            acked = [n for i, n in nodes.items() if i in held]
            failed = [n for i, n in nodes.items() if i not in held]
            if failed:
                self.counters.add("put_failures", len(failed))
            self.host.submit(lambda: self._put_done(home, acked, failed, migrate))

        fut.add_done_callback(done)

    def _put_done(self, home: str, acked: list[SegmentNode], failed: list[SegmentNode],
                  migrate: bool) -> None:
        if migrate:  # failed ones stay designated here; tried again at the next change
            self._migrating.difference_update(n.key for n in acked + failed)
        for n in acked:
            if n.parent is None:
                continue  # evicted meanwhile
            n.owners.add(home)
            if migrate and n.value is not None and n.designated and not self.view.designated(n):
                self.tree.set_designated(n, False)
                self.index.retract([n.key])
            if not self.config.transient_copies:
                self.drop.add(n)

    def migrate(self, node: SegmentNode) -> bool:
        """Hand the pool's only copy of ``node`` to its new home (membership changed).

        Returns False when another live member already holds it.
        """
        if node.key in self._migrating:
            return True
        if any(self.view.usable(o) for o in node.owners):
            return False
        home = self.view.target_of(node.key)
        if home == self.self_id:
            return False
        path = self.tree.path_to(node)
        self._migrating.add(node.key)
        self.counters.add("migrated_segments")
        self._put(home, [x.key for x in path], path, [len(path) - 1], migrate=True)
        return True

    def remote_run(self, keys: list[int], raw: bytes, start: int) -> list[SegmentNode]:
        """The segments after the local prefix that live pool members can serve.

        A local node inside the run must hold the request's own tokens (``raw``,
        int64 bytes of the request's full segments); the run ends before one that
        does not (a key collision), exactly as a local match would.
        """
        if len(self.view.alive()) == 1:
            return []
        run = []
        step = self.S * 8
        for i, node in enumerate(self.tree.run_after(keys, start), start):
            if node.value is not None:
                if node.tokens != raw[i * step : (i + 1) * step]:
                    break
            elif not any(self.view.usable(o) for o in node.owners):
                break
            run.append(node)
        return run

    def assign(self, run: list[SegmentNode], new_tokens: int,
               max_new_tokens: int) -> list[Assignment]:
        """Per node of ``run``: the serving worker and the mode, by the pool's policy
        (``PoolPolicy.dispatch``); ``--tokenlake-remote-mode ship|pull`` pins the mode
        of every remote segment, and a worker that cannot ship pulls."""
        lay = self.layout
        shape = ModelShape(layers=lay.layers, q_heads=max(1, self.host.q_heads),
                           kv_heads=lay.kv_heads, head_dim=lay.head_dim, dtype_bytes=lay.itemsize)
        locations = {n.key: ({self.self_id} if n.value is not None else
                             {o for o in n.owners if self.view.usable(o)}) for n in run}
        # Memory is a cost too: the part of a pull that must evict cached segments.
        remote = sum(1 for n in run if n.value is None) * self.S
        pressure = pull_pressure(remote, max(0, self.host.free_tokens()))
        # A shipped layer's wait or a recompute stalls the running batch and this request.
        costs = self.calibration.costs(pressure, batch=1 + self.host.running_requests())
        plan = self.policy.dispatch([n.key for n in run], locations, self.view.loads(),
                                    executor=self.self_id, new_tokens=new_tokens,
                                    expected_output_tokens=min(max_new_tokens, DECODE_STEPS_CAP),
                                    shape=shape, costs=costs,
                                    # queries cannot be shipped from here: pull what is remote
                                    pin=None if self.ship_ok else Mode.PULL_KV)
        for a in plan:
            self.counters.add(f"planned_{a.mode.value}_segments")
        return plan

    def plan_run(self, req: Any, n_tokens: int, local: int, run: list[SegmentNode]) -> list[SegmentNode]:
        """Choose per remote segment ship / pull / recompute; cut the run at the first
        recompute (a hit must be one contiguous prefix) and prefetch what is pulled."""
        S = self.S
        now = time.monotonic()
        keys = tuple(n.key for n in run)
        decided = self._decisions.get(req) if req is not None else None
        if (decided is not None and decided[0] == keys and now - decided[2] < PLAN_REUSE_S
                and all(a.mode is Mode.LOCAL or n.value is None for n, a in zip(run, decided[1]))):
            # SGLang matches a waiting request again at every scheduling round: the
            # same run decided moments ago keeps its decision (and its prefetches).
            self.counters.add("plans_reused")
            plan = decided[1]
        else:
            new_tokens = max(1, n_tokens - (local + len(run)) * S)
            max_new = int(getattr(getattr(req, "sampling_params", None), "max_new_tokens", 0) or 0)
            plan = self.assign(run, new_tokens, max_new)
            cut = next((i for i, a in enumerate(plan) if a.mode is Mode.RECOMPUTE), len(plan))
            run, plan = run[:cut], plan[:cut]
            if req is not None and run:
                self._decisions.set(req, (keys[:cut], plan, now))
        self.prefetch([n for n, a in zip(run, plan) if a.mode is Mode.PULL_KV],
                      [a.worker for a in plan if a.mode is Mode.PULL_KV])
        return run

    def forget(self, req: Any) -> Optional[tuple[int, int]]:
        """A request left the scheduler: drop its dispatch decisions; return the tokens
        of its prefix pulled and shipped (``load_back``; None if it loaded nothing)."""
        self._decisions.pop(req)
        self._deferrals.pop(req)
        return self._served.pop(req)

    def sweep_requests(self) -> None:
        """Drop the decisions of requests that left without a release."""
        self._decisions.sweep()
        self._deferrals.sweep()
        self._served.sweep()

    def reset(self) -> None:
        """The cache was flushed: nothing pending refers to the old tree's nodes."""
        self.drop.clear()
        self._pulls.clear()
        self._migrating.clear()
        self._decisions.clear()
        self._deferrals.clear()
        self._served.clear()
        self.missing.clear()

    def load_back(self, req: Any, best_match_node: SegmentNode, device_node: SegmentNode,
                  host_hit_length: int) -> Optional[tuple[int, SegmentNode]]:
        """Bring in the remote run of ``req``: lease its shipped segments at their
        owners and pull the rest into local slots. Returns (tokens now usable,
        last node); all or nothing, (0, device_node) on any failure. None (SGLang
        admits the request at a later round) when a pull found segments gone from their
        owners: the index forgets them, and the next match loads what is left
        (``_defer``)."""
        stats = self.host.stats
        S = self.S
        run: list[SegmentNode] = []
        node = best_match_node
        while node is not None and node is not device_node and node.parent is not None:
            run.append(node)
            node = node.parent
        run.reverse()
        if not run or node is not device_node or len(run) * S != host_hit_length:
            stats.pull_fallbacks += 1
            return 0, device_node
        start = device_node.depth + 1
        raw = segment_bytes(req.full_untruncated_fill_ids, S, limit=(start + len(run)) * S)[start * S * 8 :]
        if len(raw) != len(run) * S * 8:
            stats.pull_fallbacks += 1
            return 0, device_node
        seg_tokens = [raw[i * S * 8 : (i + 1) * S * 8] for i in range(len(run))]
        keys = tuple(n.key for n in run)
        decided = self._decisions.get(req)
        decided_plan = (decided[1] if decided is not None and decided[0] == keys
                 else [Assignment(n.key, "", Mode.PULL_KV) for n in run])
        deadline = time.monotonic() + self.config.pull_timeout
        plan = None
        owners: dict[str, list[tuple[int, int]]] = {}
        pull: list[int] = []
        ship: list[int] = []
        for i, (n, a) in enumerate(zip(run, decided_plan)):
            if n.value is not None:
                continue
            owner = None
            if a.mode is Mode.SHIP_QUERY:
                ok_worker = a.worker in n.owners and self.view.usable(a.worker)
                owner = a.worker if ok_worker else self.owner_for(n)
            if owner is None:
                pull.append(i)
            else:
                ship.append(i)
                owners.setdefault(owner, []).append((n.depth, n.key))
        if owners:
            assert self.remote is not None
            plan = self.remote.new_plan(owners, {run[i].key: token_digest(seg_tokens[i])
                                                 for i in ship})
            if not self.remote.lease(plan, deadline):
                # No pinned copy to ship queries to: pull those segments instead.
                pull, plan = sorted(pull + ship), None
        # Pin the run (and the local nodes in it) while slots are made for it.
        self.tree.lock(run[-1])
        try:
            self.missing = []
            ok = self.load_run([run[i] for i in pull], [seg_tokens[i] for i in pull], deadline)
        finally:
            self.tree.unlock(run[-1])
        if not ok:
            if plan is not None:
                assert self.remote is not None
                self.remote.release(plan)
            if self._defer(req):
                return None
            stats.pull_fallbacks += 1
            return 0, device_node
        pulled, shipped = len(pull) * S, 0
        if plan is not None:
            assert self.remote is not None
            self.remote.attach(req, plan)
            shipped = plan.remote_tokens()
            self.counters.add("shipped_segments", len(ship))
        stats.pulled_tokens += pulled
        stats.shipped_tokens += shipped
        self._served.set(req, (pulled, shipped))
        return len(run) * S, run[-1]

    def _defer(self, req: Any) -> bool:
        """A pull found that owners no longer hold some segments (``self.missing``): forget
        those copies and leave ``req`` waiting (SGLang admits it at a later round, matched
        again: the run then stops before what is gone, and the rest still loads), instead of
        recomputing the whole run. At most ``MAX_DEFERRALS`` times per request."""
        missing, self.missing = self.missing, []
        n = self._deferrals.get(req) or 0
        if not missing or n >= MAX_DEFERRALS:
            return False
        for owner, key in missing:
            self.tree.remove_owner_keys([key], owner)
        self._deferrals.set(req, n + 1)
        self._decisions.pop(req)
        self.counters.add("pull_deferrals")
        return True

    def owner_for(self, node: SegmentNode) -> Optional[str]:
        owners = [o for o in node.owners if self.view.usable(o)]
        if not owners:
            return None
        # Spread load over replicas: the rendezvous order among the owners.
        return homes(node.key, {o: 1 for o in owners}, 1)[0]

    def prefetch(self, run: list[SegmentNode], workers: Optional[list[str]] = None) -> None:
        """Start pulling ``run``'s segments, each from ``workers[i]`` when it still holds
        it (the dispatch's replica choice), else from one of its usable owners."""
        by_owner: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(run):
            if node.value is not None or node.key in self._pulls:
                continue
            w = workers[i] if workers is not None else None
            owner = w if w in node.owners and self.view.usable(w) else self.owner_for(node)
            if owner is None:
                continue
            by_owner[owner].append(node.key)
        now = time.monotonic()
        per_get = max(1, MAX_REPLY_BYTES // self.seg_bytes)
        for owner, owned in by_owner.items():
            for at in range(0, len(owned), per_get):
                ks = owned[at : at + per_get]
                fut = self.agent.request(owner, "get", {"from": self.self_id, "keys": ks},
                                         timeout=self.config.pull_timeout, bulk=True)
                fut.add_done_callback(lambda f, o=owner, t0=now: self._timed(f, o, t0))
                for i, k in enumerate(ks):
                    self._pulls[k] = (fut, i, now, owner)
                self.counters.add("get_requests")

    def _timed(self, fut: Future, owner: str, t0: float) -> None:
        """A pull's reply arrived: measure the link with it, unless it had arrived before
        anyone read it (a KV stream reply read late: its time is not the link's)."""
        if fut.exception() is None and getattr(fut, "waited", True):
            nbytes = sum(b.nbytes for b in fut.result().buffers)
            self.calibration.observe_transfer(owner, nbytes, time.monotonic() - t0)

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
            if entry is None:  # no usable owner to ask
                self._pull_failed("pull_no_owner")
                return False
            fut, i, _, owner = entry
            try:
                msg = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as e:
                self._pull_failed("pull_errors")
                logger.info("TokenLake: pull of a segment failed (%s); recomputing", e)
                return False
            found, toks = msg.header.get("found"), msg.header.get("tokens")
            if not isinstance(found, list) or i >= len(found) or not found[i]:
                self._pull_failed("pull_not_found")  # evicted at the owner since announced
                self.missing.append((owner, n.key))
                return False
            j = sum(1 for f in found[:i] if f)
            if not isinstance(toks, list) or j >= len(toks) or toks[j] != want:
                self.counters.add("pull_token_mismatch")
                return False
            buf = msg.buffers[j] if j < len(msg.buffers) else None
            if buf is None or buf.nbytes != self.seg_bytes:
                self._pull_failed("pull_bad_reply")
                return False
            datas.append(buf)
        if not need:
            return True
        slots = self.host.alloc_slots(len(need) * self.S)
        if slots is None:
            self.counters.add("pull_no_memory")
            return False
        for j, ((node, tok), buf) in enumerate(zip(need, datas)):
            seg = slots[j * self.S : (j + 1) * self.S]
            kvio.scatter(self.kvcache, seg, wire_tensor(buf), self.layout)
            keys = [x.key for x in self.tree.path_to(node)]
            designated = self.view.designated(node, new_copy=True)
            _, adopted = self.tree.adopt(keys, (slots, j * self.S), tok, designated=designated)
            assert adopted
            if designated:
                self.index.announce(keys, [len(keys) - 1])
            elif not self.config.transient_copies:
                self.drop.add(node)
        self.counters.add("pulled_segments", len(need))
        self.counters.add("pulled_bytes", len(need) * self.seg_bytes)
        return True

    def _pull_failed(self, why: str) -> None:
        """Count a failed pull (``pull_failures``) and its cause (``why``)."""
        self.counters.add("pull_failures")
        self.counters.add(why)

    def sweep_transient(self) -> None:
        """Drop transient copies whose home holds them, once no request uses them."""
        ready = [n for n in self.drop if n.value is not None and n.lock_ref == 0 and n.owners
                 and not n.designated]
        if not ready:
            return
        self.drop.difference_update(ready)
        self.host.drop_nodes(ready)

    def tick(self, now: float) -> None:
        """Scheduler thread, each poll: mark what peers pulled as used; expire stale pulls."""
        self.server.mark_served()
        self.expire_pulls(now)

    def expire_pulls(self, now: float) -> None:
        for k, (_, _, t0, _) in list(self._pulls.items()):
            if now - t0 > 30.0:
                del self._pulls[k]  # prefetched but never used (its reply may be unread)
