"""TokenLake in the simulator: the pool driven by ``policy.PoolPolicy``, the live pool's policy.

Every policy decision is ``PoolPolicy``'s: placement of new segments (``place_run``, on
eviction horizons measured on the simulator's logical clock), replica counts
(``plan_replicas`` from one pool-wide ``HeavyHitters``), the pool-wide leaf-first
rule (``keep_last_copy``) and dispatch (``dispatch``). This module only keeps the
books: per-instance LRUs, the location index, bytes and modes.

Per request:

1. Hit: the longest prefix of the request's full segments that some instance
   holds (``locations``: key -> instances with a copy).
2. Executor: the instance with the least queued GPU work, plus the time its
   missing segments would take to pull (so ties go to the one holding most), or
   the front end's rule (``SimConfig.tokenlake_executor``).
3. ``PoolPolicy.dispatch`` picks a replica and a mode for each cached segment;
   SHIP_QUERY charges partial attention to the owner's GPU, PULL_KV moves bytes.
4. Cache update, deepest segment first: served copies are touched; new
   segments go where ``PoolPolicy.place_run`` says (by default all stay on the
   executor; ``put`` bytes when their home is not the executor); each instance
   evicts its least recently used segments, passing over those
   ``keep_last_copy`` protects; with ``spill_margin`` the pool's last copy of
   an evicted segment goes to ``PoolPolicy.spill_to``'s member instead, at its age.
5. Every ``replan_every`` requests ``PoolPolicy.plan_replicas`` turns the heavy
   hitters into copies; extra copies are made at the next-best rendezvous homes
   (``replicate`` bytes) and dropped when a segment cools.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import replace

from sglang_tokenlake.bench.proxy import Balancer
from sglang_tokenlake.dispatch import Mode, pull_pressure
from sglang_tokenlake.placement import Placement
from sglang_tokenlake.policy import SPILL_SHARE, PoolPolicy, hops_since_use
from sglang_tokenlake.sim.cache import PrefixLRU, new_cache
from sglang_tokenlake.sim.cluster import Cluster
from sglang_tokenlake.sim.model import Outcome, SimConfig
from sglang_tokenlake.sim.policies import Policy, proxy_pick, route_cache_aware
from sglang_tokenlake.sim.routing import CacheAwareRouter
from sglang_tokenlake.sim.workloads import Request

_MEMO: dict[tuple[str, ...], tuple[dict, dict]] = {}  # member ids -> memoized homes


def _placement(members: dict[str, float]) -> Placement:
    """A ``Placement`` of equal-weight ``members`` that shares its memoized homes with every
    earlier one of the same ids in this process: with equal weights the homes do not depend
    on their value (every score scales alike), so runs at other capacities reuse them."""
    p = Placement(members)
    if len(set(members.values())) == 1:
        ids = tuple(members)
        if ids not in _MEMO:
            _MEMO.clear()
            _MEMO[ids] = (p._home, p._homes)
        p._home, p._homes = _MEMO[ids]
    return p


class Horizons(Mapping[str, float]):
    """Each instance's eviction horizon on the logical clock: ``clock - stamp of its least
    recently used segment``; ``inf`` while its cache has free room. Computed on lookup
    (``PoolPolicy.place`` asks only for its candidates)."""

    def __init__(self, caches: Mapping[str, PrefixLRU]) -> None:
        self.caches = caches
        self.clock = 0

    def __getitem__(self, w: str) -> float:
        return self.clock - self.caches[w].oldest_stamp()  # -(-inf) = inf: free room

    def __iter__(self) -> Iterator[str]:
        return iter(self.caches)

    def __len__(self) -> int:
        return len(self.caches)


class TokenLake(Policy):
    name = "tokenlake"

    def __init__(self, cfg: SimConfig, cluster: Cluster) -> None:
        super().__init__(cfg, cluster)
        self.ids = cluster.ids
        self.index = {w: i for i, w in enumerate(self.ids)}
        self.caches = {w: new_cache(cfg.capacity_blocks, cfg.policy) for w in self.ids}
        # Members weigh their capacity in tokens (equal here: homes do not depend on it;
        # the replica budget is a share of its sum).
        members = dict.fromkeys(self.ids, float(cfg.capacity_blocks * self.seg))
        self.policy = PoolPolicy(cfg.policy, self.seg, members, cfg.shape, cfg.costs)
        self.policy.placement = _placement(members)
        self.loc: dict[int, set[str]] = {}
        # Pool-wide leaf-first eviction: parent of each located segment and how many
        # located children each segment has.
        self.parent: dict[int, int] = {}
        self.nkids: dict[int, int] = defaultdict(int)
        self.hh = cfg.policy.heavy_hitters()  # one pool-wide view of the accesses
        self.horizons = Horizons(self.caches)
        self.costs = cfg.costs
        self._served = 0
        self._rng = random.Random(0)  # power_of_two's two samples
        # The harness proxy's picks (least_inflight: its least_load; bounded_load).
        self._balancer = Balancer(len(self.ids), "bounded_load" if cfg.tokenlake_executor
                                  == "bounded_load" else "least_load", cfg.load_factor)
        self._router = (CacheAwareRouter(self.ids, cfg.tokenlake_router)
                        if cfg.tokenlake_executor == "cache_aware" else None)
        self._modes: dict[str, int] = defaultdict(int)  # segments served per mode
        self._replicas_made = 0
        self._replicas_dropped = 0
        self._peak_extra = 0
        # Spilling (``PolicyConfig.spill_margin``): the current window's start, the members
        # that may still receive in it (their horizons at its start), what each received,
        # the segments spilled, and their bytes not yet reported.
        self._spill = cfg.policy.spill_margin > 0
        self._window_at = float("-inf")
        self._open: dict[str, float] = {}
        self._sent: dict[str, int] = {}
        self._now = 0.0
        self._spilled = 0
        self._evicted = self._evicted_last = 0  # segments evicted; of them the pool's last copies
        self._spill_bytes = 0
        # key -> (hand-overs, its stamp then): the count holds while the stamp does (a
        # request's use restamps the segment and so resets it).
        self._hops: dict[int, tuple[int, float]] = {}

    # -- per request ---------------------------------------------------------------

    def serve(self, req: Request, now: float) -> Outcome:
        seg, shape, loc = self.seg, self.cfg.shape, self.loc
        self._now = now
        full = self.full(req)
        k = 0
        while k < len(full) and full[k] in loc:
            k += 1
        observe = self.hh.observe
        for key in full:
            observe(key)

        # Executor: least queued work + time to pull what it lacks.
        n = len(self.ids)
        pull_s = self.costs.pull_s(shape, seg)
        extra = [k * pull_s] * n
        for key in full[:k]:
            for w in loc[key]:
                extra[self.index[w]] -= pull_s
        if self.cfg.tokenlake_executor == "round_robin":
            ex = self._rr % n
            self._rr += 1
        elif self.cfg.tokenlake_executor == "power_of_two":  # sglang-router's rule
            a, b = self._rng.sample(range(n), 2) if n > 1 else (0, 0)
            xs = self.cluster.instances
            ex = a if xs[a].inflight(now) <= xs[b].inflight(now) else b
        elif self._router is not None:  # sglang-router's cache_aware rule, pool bounds
            ex = self.index[route_cache_aware(self._router, req, self.cfg, self.cluster, now)]
        elif self.cfg.tokenlake_executor in ("least_inflight", "bounded_load"):  # the proxy
            ex = proxy_pick(self._balancer, req, self.cluster, now, self.seg)
        else:
            ex = self.least_loaded(now, extra)
        ex_id = self.ids[ex]

        moved: dict[str, int] = {}
        shipped: dict[int, int] = {}
        serving: dict[int, str] = {}
        hit = 0
        if k:
            loads = {w: x.backlog(now) for w, x in zip(self.ids, self.cluster.instances)}
            new = req.input_tokens - k * seg
            # As live: shipping and recompute stall the executor's running requests too,
            # and a pull that must evict the executor's cached segments pays for them
            # where the memory model gives a pulled copy room of its own (shipping none).
            pressure = 0.0
            if self.cfg.memory_pressure and self.cfg.shared_prefix_kv:
                cache = self.caches[ex_id]
                remote = sum(1 for key in full[:k] if ex_id not in loc[key]) * seg
                pressure = pull_pressure(remote, max(0, cache.capacity - len(cache)) * seg)
            costs = replace(self.costs, batch=1 + self.cluster.instances[ex].inflight(now),
                            memory_pressure=pressure)
            out = self.policy.dispatch(full[:k], loc, loads, executor=ex_id, new_tokens=new,
                                       expected_output_tokens=req.output_tokens, costs=costs)
            ship_owners = set()
            for a in out:
                self._modes[a.mode.value] += 1
                if a.mode is Mode.RECOMPUTE:
                    continue
                hit += seg
                serving[a.key] = a.worker
                if a.mode is Mode.PULL_KV:
                    moved["pull_kv"] = moved.get("pull_kv", 0) + shape.kv_bytes(seg)
                elif a.mode is Mode.SHIP_QUERY:
                    o = self.index[a.worker]
                    shipped[o] = shipped.get(o, 0) + seg
                    ship_owners.add(a.worker)
            if ship_owners:
                moved["ship_query"] = len(ship_owners) * shape.query_bytes(
                    max(req.input_tokens - hit, 1) + req.output_tokens)
        transfer_s = moved.get("pull_kv", 0) / self.cfg.bandwidth_Bps

        put = self._update(full, serving, ex_id)
        if put:
            moved["put"] = put
        self._served += 1
        if self._served % self.cfg.policy.replan_every == 0:
            moved_r = self.replan()
            if moved_r:
                moved["replicate"] = moved_r
        if self._spill_bytes:  # spilled since the last request (its evictions, pressure)
            moved["spill"], self._spill_bytes = self._spill_bytes, 0
        # KV the executor holds outside its cache: the prompt less what it keeps as a
        # home (local hits, new segments placed here) and what owners serve (shipped).
        kept = sum(1 for key in full if ex_id in loc.get(key, ()))
        held = req.input_tokens - (kept * seg + sum(shipped.values()))
        return Outcome(ex, hit, shipped, moved, transfer_s, held)

    def _update(self, full, serving: dict[int, str], ex_id: str) -> int:
        """Touch served copies and place new segments, deepest first; evict; return put bytes."""
        loc, caches, seg_b = self.loc, self.caches, self.cfg.shape.kv_bytes(self.seg)
        touched: set[str] = set()
        put = 0
        pol, horizons = self.policy, self.horizons
        choices = self.cfg.policy.placement_choices
        horizons.clock += 1
        stamp = horizons.clock
        run: dict[int, list[str]] = {}
        if self.cfg.policy.placement != "segment":  # one home for the request's new segments
            run = pol.place_run([key for key in full if key not in loc], ex_id, horizons)
        for i in range(len(full) - 1, -1, -1):
            key = full[i]
            par = full[i - 1] if i else None
            holders = loc.get(key)
            w = serving.get(key)
            if w is not None and holders and w in holders:
                caches[w].touch(key, stamp, par, i)
                touched.add(w)
                continue
            if holders:  # recomputed although cached somewhere: refresh those copies
                for h in holders:
                    caches[h].touch(key, stamp, par, i)
                    touched.add(h)
                continue
            targets = run.get(key) or pol.place(key, horizons)
            loc[key] = set(targets)
            if i:
                self.parent[key] = full[i - 1]
                self.nkids[full[i - 1]] += 1
            for t in targets:
                caches[t].touch(key, stamp, par, i)
                if choices > 1:
                    self._evict(t)  # keep horizons current for the next choice
                else:
                    touched.add(t)
                if t != ex_id:
                    put += seg_b
        for w in sorted(touched, key=self.index.__getitem__):  # fixed order: spills depend on it
            self._evict(w)
        return put

    def pressure(self, running: Mapping[int, int], now: float) -> None:
        self._now = now
        for i, tokens in running.items():
            w = self.ids[i]
            self.caches[w].capacity = self.room(tokens)
            self._evict(w)

    def _evict(self, w: str) -> None:
        """Evict ``w`` to its capacity, then every member that received spilled segments
        from it (and so on: each hand-over goes to older data, and each member receives
        at most its share per window, so this ends)."""
        todo = [w]
        while todo:
            received = self._evict_one(todo.pop())
            todo.extend(t for t in sorted(received, key=self.index.__getitem__) if t not in todo)

    def _evict_one(self, w: str) -> set[str]:
        """Evict ``w`` to its capacity; return the members its last copies spilled to."""
        loc, nkids = self.loc, self.nkids
        keep = None
        if self.cfg.policy.pool_leaf_first:
            keep_last = self.policy.keep_last_copy

            def keep(key: int) -> bool:
                return keep_last(nkids.get(key, 0) > 0, len(loc.get(key, ())) - 1)

        received: set[str] = set()
        spill = self._spill

        def dropped(key: int, stamp: float) -> None:
            self._evicted += 1
            holders = loc.get(key)
            if holders is None:
                return
            holders.discard(w)
            if holders:
                return
            if spill:  # the pool's last copy: spill it to older data
                hops = hops_since_use(self._hops.get(key), stamp)
                t = self._spill_target(w, self.horizons.clock - stamp, hops)
                if t is not None:
                    self._hops[key] = (hops + 1, stamp)
                    holders.add(t)
                    self.caches[t].place(key, stamp, self.parent.get(key))
                    received.add(t)
                    self._spilled += 1
                    self._spill_bytes += self.cfg.shape.kv_bytes(self.seg)
                    return
            del loc[key]
            self._evicted_last += 1
            self._hops.pop(key, None)
            p = self.parent.pop(key, None)
            if p is not None:
                left = nkids[p] - 1
                if left > 0:
                    nkids[p] = left
                else:
                    del nkids[p]

        self.caches[w].overflow(keep, dropped=dropped)
        return received

    def _spill_target(self, w: str, age: float, hops: int = 0) -> str | None:
        """``PoolPolicy.spill_to`` from ``w``, as the live ``pool.spill.Spill``: on the
        horizons as they were at the start of the window (live: announced with the last
        heartbeat), among the members that have received less than ``SPILL_SHARE`` of their
        capacity in it; counts the segment against the one chosen."""
        share = SPILL_SHARE * self.cfg.capacity_blocks
        if self._now - self._window_at >= self.cfg.spill_window_s:
            self._window_at = self._now
            self._open = {m: self.horizons[m] for m in self.ids} if share >= 1 else {}
            self._sent = {}
        open_ = self._open
        own = open_.pop(w, None)
        t = self.policy.spill_to(age, open_, hops)
        if own is not None:
            open_[w] = own
        if t is not None:
            n = self._sent[t] = self._sent.get(t, 0) + 1
            if n + 1 > share:
                del open_[t]
        return t

    # -- replicas ---------------------------------------------------------------------

    def replan(self) -> int:
        """Re-plan hot-segment replicas; return the bytes copying new replicas moved."""
        pol = self.policy
        before = pol.copies
        pol.plan_replicas(self.hh.hot())
        want, homes = pol.copies, pol.placement.homes
        loc, caches = self.loc, self.caches
        seg_b = self.cfg.shape.kv_bytes(self.seg)
        for key, old in before.items():
            new = want.get(key, 1)
            if new < old and key in loc:
                for t in homes(key, old)[new:]:
                    if t in loc[key] and len(loc[key]) > 1:
                        loc[key].discard(t)
                        caches[t].discard(key)
                        self._replicas_dropped += 1
        moved, touched = 0, set()
        for key, c in want.items():
            holders = loc.get(key)
            if not holders:
                continue
            for t in homes(key, c):  # up to c copies: the first may live off its homes
                if len(holders) >= c:
                    break
                if t not in holders:
                    holders.add(t)
                    caches[t].touch(key, self.horizons.clock, self.parent.get(key))
                    touched.add(t)
                    moved += seg_b
                    self._replicas_made += 1
        for w in sorted(touched, key=self.index.__getitem__):  # fixed order: spills depend on it
            self._evict(w)
        extra = sum(len(loc[k]) - 1 for k in want if k in loc)
        self._peak_extra = max(self._peak_extra, extra)
        return moved

    def stats(self) -> dict:
        total = max(sum(self._modes.values()), 1)
        return {
            "segments_by_mode": {m: round(v / total, 4) for m, v in sorted(self._modes.items())},
            "replicas_made": self._replicas_made,
            "replicas_dropped": self._replicas_dropped,
            "peak_extra_replicas": self._peak_extra,
            "evicted_segments": self._evicted,
            "evicted_last_copies": self._evicted_last,
            "hot_segments_last_plan": len(self.policy.copies),
            **({"spilled_segments": self._spilled} if self._spill else {}),
            **({"router_decisions": dict(self._router.decisions)} if self._router else {}),
        }
