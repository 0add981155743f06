"""TokenLake in the simulator: the pool driven by placement, heavy hitters and dispatch.

Per request:

1. Hit: the longest prefix of the request's full segments that some instance
   holds (``locations``: key -> instances with a copy).
2. Executor: the instance with the least queued GPU work, plus the time its
   missing segments would take to pull (so ties go to the one holding most).
3. ``dispatch.plan`` picks a replica and a mode for each cached segment;
   SHIP_QUERY charges partial attention to the owner's GPU, PULL_KV moves bytes.
4. Cache update, deepest segment first: served copies are touched; new
   segments go to their rendezvous home(s) (``put`` bytes when that is not the
   executor); each instance evicts its least recently used segments.
5. Every ``replan_every`` requests the heavy hitters (``HeavyHitters`` over the
   last ``hh_window`` segment accesses) are turned into replica counts
   (``ReplicaPlanner``, ``replica_budget`` of the pool), extra copies are made at
   the next-best rendezvous homes (``replicate`` bytes) and dropped when a
   segment cools.
"""

from __future__ import annotations

from collections import defaultdict

from sglang_tokenlake.dispatch import Mode, plan
from sglang_tokenlake.hotness import HeavyHitters, ReplicaPlanner
from sglang_tokenlake.placement import Placement
from sglang_tokenlake.sim.cache import PrefixLRU
from sglang_tokenlake.sim.cluster import Cluster
from sglang_tokenlake.sim.engine import Outcome, SimConfig
from sglang_tokenlake.sim.policies import Policy
from sglang_tokenlake.sim.workloads import Request

_PLACEMENTS: dict[tuple[str, ...], Placement] = {}  # memoized homes, reused across runs


def _placement(ids: list[str]) -> Placement:
    """Equal-capacity placement over ``ids`` (equal weights: homes do not depend on the value)."""
    key = tuple(ids)
    if key not in _PLACEMENTS:
        _PLACEMENTS.clear()
        _PLACEMENTS[key] = Placement(dict.fromkeys(ids, 1.0))
    return _PLACEMENTS[key]


class TokenLake(Policy):
    name = "tokenlake"

    def __init__(self, cfg: SimConfig, cluster: Cluster) -> None:
        super().__init__(cfg, cluster)
        self.ids = cluster.ids
        self.index = {w: i for i, w in enumerate(self.ids)}
        self.caches = {w: PrefixLRU(cfg.capacity_blocks) for w in self.ids}
        self.placement = _placement(self.ids)
        self.loc: dict[int, set[str]] = {}
        # Pool-wide leaf-first eviction: parent of each located segment and how many
        # located children each segment has.
        self.parent: dict[int, int] = {}
        self.nkids: dict[int, int] = defaultdict(int)
        self.hh = HeavyHitters(cfg.hh_window, cfg.hh_k)
        budget = int(cfg.replica_budget * cfg.capacity_blocks * cfg.instances) * self.seg
        self.planner = ReplicaPlanner(budget, self.seg)
        self.copies: dict[int, int] = {}  # planned copies of hot segments
        self.costs = cfg.costs
        self._served = 0
        self._clock = 0
        self._modes: dict[str, int] = defaultdict(int)  # segments served per mode
        self._replicas_made = 0
        self._replicas_dropped = 0
        self._peak_extra = 0

    # -- per request ---------------------------------------------------------------

    def serve(self, req: Request, now: float) -> Outcome:
        seg, shape, loc = self.seg, self.cfg.shape, self.loc
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
        ex = self.least_loaded(now, extra)
        ex_id = self.ids[ex]

        moved: dict[str, int] = {}
        shipped: dict[int, int] = {}
        serving: dict[int, str] = {}
        hit = 0
        if k:
            loads = {w: x.backlog(now) for w, x in zip(self.ids, self.cluster.instances)}
            new = req.input_tokens - k * seg
            out = plan(full[:k], loc, loads, executor=ex_id, new_tokens=new,
                       expected_output_tokens=req.output_tokens, segment_tokens=seg,
                       shape=shape, costs=self.costs)
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
        if self._served % self.cfg.replan_every == 0:
            moved_r = self.replan()
            if moved_r:
                moved["replicate"] = moved_r
        return Outcome(ex, hit, shipped, moved, transfer_s)

    def _update(self, full, serving: dict[int, str], ex_id: str) -> int:
        """Touch served copies and place new segments, deepest first; evict; return put bytes."""
        loc, caches, seg_b = self.loc, self.caches, self.cfg.shape.kv_bytes(self.seg)
        touched: set[str] = set()
        put = 0
        choices = self.cfg.placement_choices
        self._clock += 1
        stamp = self._clock
        for i in range(len(full) - 1, -1, -1):
            key = full[i]
            holders = loc.get(key)
            w = serving.get(key)
            if w is not None and holders and w in holders:
                caches[w].touch(key, stamp)
                touched.add(w)
                continue
            if holders:  # recomputed although cached somewhere: refresh those copies
                for h in holders:
                    caches[h].touch(key, stamp)
                    touched.add(h)
                continue
            c = self.copies.get(key, 1)
            if c > 1:
                targets = self.placement.homes(key, c)
            elif choices > 1:  # the candidate home whose LRU holds the oldest data
                targets = [min(self.placement.homes(key, choices),
                               key=lambda t: caches[t].oldest_stamp())]
            else:
                targets = [self.placement.home(key)]
            loc[key] = set(targets)
            if i:
                self.parent[key] = full[i - 1]
                self.nkids[full[i - 1]] += 1
            for t in targets:
                caches[t].touch(key, stamp)
                if choices > 1:
                    self._evict(t)  # keep ages current for the next choice
                else:
                    touched.add(t)
                if t != ex_id:
                    put += seg_b
        for w in touched:
            self._evict(w)
        return put

    def _evict(self, w: str) -> None:
        loc, nkids = self.loc, self.nkids
        keep = None
        if self.cfg.pool_leaf_first:
            # Pass over the last copy of a segment whose children are cached somewhere:
            # dropping it would strand them (a prefix is only usable from the root).
            def keep(key: int) -> bool:
                return nkids.get(key, 0) > 0 and len(loc.get(key, ())) == 1

        for key in self.caches[w].overflow(keep):
            holders = loc.get(key)
            if holders is not None:
                holders.discard(w)
                if not holders:
                    del loc[key]
                    p = self.parent.pop(key, None)
                    if p is not None:
                        left = nkids[p] - 1
                        if left > 0:
                            nkids[p] = left
                        else:
                            del nkids[p]

    # -- replicas ---------------------------------------------------------------------

    def replan(self) -> int:
        """Re-plan hot-segment replicas; return the bytes copying new replicas moved."""
        want = self.planner.plan(self.hh.hot(), len(self.ids))
        loc, caches = self.loc, self.caches
        seg_b = self.cfg.shape.kv_bytes(self.seg)
        for key, old in self.copies.items():
            new = want.get(key, 1)
            if new < old and key in loc:
                for t in self.placement.homes(key, old)[new:]:
                    if t in loc[key] and len(loc[key]) > 1:
                        loc[key].discard(t)
                        caches[t].discard(key)
                        self._replicas_dropped += 1
        moved, touched = 0, set()
        for key, c in want.items():
            holders = loc.get(key)
            if not holders:
                continue
            for t in self.placement.homes(key, c):
                if t not in holders:
                    holders.add(t)
                    caches[t].touch(key, self._clock)
                    touched.add(t)
                    moved += seg_b
                    self._replicas_made += 1
        self.copies = want
        for w in touched:
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
            "hot_segments_last_plan": len(self.copies),
        }
