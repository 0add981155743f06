"""PoolPolicy: the one policy the simulator and the live pool both call.

It decides, from what the pool knows (members, their eviction horizons, the
pool-wide hotness view, where every segment is held, owner loads):

- **placement**: where a new segment is kept. A hot segment (``copies > 1``)
  goes to its ``copies`` best rendezvous homes. Any other segment, by the
  ``placement`` rule: ``segment`` puts each at one of its ``placement_choices``
  best homes, the one whose oldest cached data is oldest (the largest
  *eviction horizon*), so memory pressure spreads evenly (two-choice
  placement; ties keep rendezvous order); ``chain`` puts all of a request's new
  segments at that home of its deepest one; ``executor`` keeps them on the
  worker that computed them. With ``segment`` a worker's copy is a legitimate
  home (``is_home``) while it is one of those candidates; with the other rules
  any holder is, and when several hold one, the first ``copies`` of them in
  rendezvous order keep theirs (``keeps``).
- **replicas**: copies per hot segment from the heavy hitters' shares
  (``ReplicaPlanner`` under ``replica_budget`` of the pool's capacity).
- **eviction**: the pool-wide leaf-first rule (``keep_last_copy``): the last
  copy of a segment whose children are cached somewhere is passed over; a
  prefix is usable only from the root, so dropping it would strand them. A
  last copy a member evicts moves to the member whose oldest data is much older
  (``spill_to``), so that the pool as a whole drops its least recently used
  segments rather than each member its own.
- **dispatch**: per request, the replica and the mode of each cached segment
  (``dispatch.plan``: balanced replica choice, then ship / pull / recompute).

Horizons: for each member, how long ago its least recently used evictable
segment was used (any clock; larger = less pressure); ``inf`` while it has free
room. The simulator measures them on its logical clock, live members announce
theirs with heartbeats.

Plain Python: no torch, sglang or zmq.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from sglang_tokenlake.dispatch import Assignment, Costs, Mode, ModelShape, plan
from sglang_tokenlake.eviction import AwareParams, check_eviction
from sglang_tokenlake.hotness import HeavyHitters, ReplicaPlanner
from sglang_tokenlake.placement import Placement

PLACEMENTS = ("segment", "chain", "executor")
REMOTE_MODES = ("auto", "ship", "pull")
SPILL_SHARE = 0.25
"""Of a member's capacity, at most this much is spilled to it per heartbeat interval
(its announced horizon does not see what was sent since)."""


@dataclass(frozen=True)
class PolicyConfig:
    """Parameters of the pool's policy, the same record for the simulator and live workers."""

    replica_budget: float = 0.05
    """Share of the pool's KV capacity that extra replicas of hot segments may occupy
    (0 turns replication off)."""
    hot_window: int = 16384
    """Segment accesses the heavy-hitter estimate covers (a sliding window)."""
    hot_k: int = 256
    """Counters of the heavy-hitter estimate; shares below 1/k cannot be told apart."""
    replan_every: int = 64
    """Requests (pool-wide) between replica plans."""
    placement_choices: int = 2
    """A new segment goes to whichever of its best ``placement_choices`` rendezvous
    homes has the largest eviction horizon (1: always the first home)."""
    placement: str = "executor"
    """Where a request's new segments are kept (``PLACEMENTS``): ``segment``, each at its
    own two-choice home; ``chain``, all at the two-choice home of the deepest; ``executor``,
    all where they were computed."""
    pool_leaf_first: bool = True
    """Keep the last copy of a segment whose children are cached somewhere."""
    eviction: str = "lru"
    """Order in which a member evicts its segments (``eviction.EVICTIONS``): ``lru`` or
    ``aware`` (recency, reuse frequency and depth; see ``eviction``)."""
    aware: AwareParams = AwareParams()
    """Weights of the ``aware`` score."""
    spill_margin: float = 0.0
    """A member about to evict the pool's last copy of a segment hands it to the member
    with the largest eviction horizon when that horizon is more than ``spill_margin``
    times the segment's age (how long ago it was last used); 0 never hands one over
    (the default: on longdoc it moved segments without keeping more hits, docs/bench.md)."""
    spill_hops: int = 4
    """With ``spill_margin``: a segment handed over this many times since a request last
    used it is dropped at its next eviction instead (0: no limit). Each hand-over puts a
    segment among the receiver's oldest, so data nobody uses is otherwise handed on and
    on; 4 kept more hits than no limit for 60% of its traffic (chosen on the first half of
    the conversation trace, results/sim/spill/tuning)."""

    remote_mode: str = "auto"
    """How a remote segment is served (``REMOTE_MODES``): ``auto``, per owner whichever
    of shipping, pulling and recomputing takes the least time (``dispatch.plan``);
    ``ship`` or ``pull`` always that mode."""

    def __post_init__(self) -> None:
        check_eviction(self.eviction)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, "
                             f"got {self.placement!r}")
        if not 0.0 <= self.replica_budget <= 1.0:
            raise ValueError(f"replica_budget must be in [0, 1], got {self.replica_budget}")
        if self.hot_window < 16 or self.hot_k < 2:
            raise ValueError("hot_window must be >= 16 and hot_k >= 2")
        if self.replan_every < 1 or self.placement_choices < 1:
            raise ValueError("replan_every and placement_choices must be >= 1")
        if not (self.spill_margin == 0 or self.spill_margin >= 1):  # NaN fails both
            raise ValueError(f"spill_margin must be 0 (off) or >= 1, got {self.spill_margin}")
        if self.remote_mode not in REMOTE_MODES:
            raise ValueError(f"remote_mode must be one of {', '.join(REMOTE_MODES)}, "
                             f"got {self.remote_mode!r}")
        if not (isinstance(self.spill_hops, int) and self.spill_hops >= 0):
            raise ValueError(f"spill_hops must be an integer >= 0 (0: no limit), "
                             f"got {self.spill_hops!r}")

    @property
    def pinned_mode(self) -> Mode | None:
        """The mode every remote segment takes (``remote_mode`` ship/pull), else None."""
        return {"ship": Mode.SHIP_QUERY, "pull": Mode.PULL_KV}.get(self.remote_mode)

    def heavy_hitters(self) -> HeavyHitters:
        """A fresh heavy-hitter estimate with these parameters."""
        return HeavyHitters(self.hot_window, self.hot_k)


def hops_since_use(handed: tuple[int, float] | None, last_use: float) -> int:
    """Times a segment was handed over by spilling since a request last used it:
    ``handed`` is (count, its last use when it last arrived) or None; a use since then
    (another ``last_use``) resets the count. The live node and the simulator keep it alike."""
    return handed[0] if handed is not None and handed[1] == last_use else 0


class PoolPolicy:
    """Placement, replicas, eviction and dispatch rules of one pool.

    Args:
        cfg: the policy's parameters.
        segment_size: tokens per segment.
        members: live member id -> capacity in tokens (> 0).
        shape: attention shape of the served model (dispatch's byte counts).
        costs: what moving and computing cost (dispatch's time model).
    """

    def __init__(self, cfg: PolicyConfig, segment_size: int, members: Mapping[str, float],
                 shape: ModelShape | None = None, costs: Costs | None = None) -> None:
        if segment_size <= 0:
            raise ValueError(f"segment_size must be positive, got {segment_size}")
        self.cfg = cfg
        self.segment_size = segment_size
        self.shape = shape or ModelShape()
        self.costs = costs or Costs()
        self.copies: dict[int, int] = {}  # key -> copies wanted (hot segments only)
        self.planner = ReplicaPlanner(0, segment_size)
        self.placement = Placement(members)

    # -- members ---------------------------------------------------------------------

    @property
    def members(self) -> dict[str, float]:
        return self.placement.members

    def set_members(self, members: Mapping[str, float]) -> None:
        """The live member set changed (join, leave, capacity)."""
        if dict(members) != self.placement.members:
            self.placement = Placement(members)

    # -- placement -------------------------------------------------------------------

    def candidates(self, key: int) -> list[str]:
        """The members that may hold ``key`` as one of its homes (best first): with
        ``segment`` placement its best rendezvous homes, else every member (a chain is
        kept wherever it was placed), ranked by rendezvous score."""
        if self.cfg.placement != "segment":
            return self.placement.homes(key, len(self.placement))
        c = self.copies.get(key, 1)
        return self.placement.homes(key, max(c, self.cfg.placement_choices))

    def is_home(self, key: int, member: str) -> bool:
        """May ``member`` keep ``key`` as a designated (announced, non-transient) copy?"""
        if len(self.placement) == 1:
            return True
        return member in self.candidates(key)

    def keeps(self, key: int, member: str, holders: Collection[str]) -> bool:
        """Is ``member``'s copy of ``key`` one of its designated copies, when ``holders``
        (other members) hold it too? The first ``copies`` candidates holding it, in
        rendezvous order, keep theirs, so any two holders agree on which stays."""
        cands = self.candidates(key)
        if member not in cands:
            return False
        ranked = [m for m in cands if m == member or m in holders]
        return member in ranked[: self.copies.get(key, 1)]

    def held_enough(self, key: int, holders: Collection[str]) -> bool:
        """Do ``holders`` include as many of the candidates as ``key`` needs copies?"""
        return sum(1 for m in self.candidates(key) if m in holders) >= self.copies.get(key, 1)

    def place(self, key: int, horizons: Mapping[str, float]) -> list[str]:
        """Where a new copy of ``key`` is kept: its homes if hot, else the candidate with
        the largest eviction horizon (missing horizons count as 0; ties: rendezvous order)."""
        c = self.copies.get(key, 1)
        if c > 1:
            return self.placement.homes(key, c)
        return [self._roomiest_home(key, horizons)]

    def _roomiest_home(self, key: int, horizons: Mapping[str, float]) -> str:
        if self.cfg.placement_choices <= 1:
            return self.placement.home(key)
        cands = self.placement.homes(key, self.cfg.placement_choices)
        best = cands[0]
        best_h = horizons.get(best, 0.0)
        for m in cands[1:]:
            h = horizons.get(m, 0.0)
            if h > best_h:
                best, best_h = m, h
        return best

    def place_run(self, keys: Sequence[int], executor: str,
                  horizons: Mapping[str, float]) -> dict[int, list[str]]:
        """Where the new copies of a request's uncached segments ``keys`` (root first) are
        kept, by ``cfg.placement``; a hot segment always goes to its homes."""
        if not keys:
            return {}
        rule = self.cfg.placement
        if rule == "segment":
            return {k: self.place(k, horizons) for k in keys}
        if rule == "executor" and executor in self.placement.members:
            run = [executor]
        else:  # chain (or an executor outside the pool): the deepest segment's home
            run = [self._roomiest_home(keys[-1], horizons)]
        copies = self.copies
        return {k: (self.placement.homes(k, copies[k]) if copies.get(k, 1) > 1 else run)
                for k in keys}

    # -- replicas --------------------------------------------------------------------

    def plan_replicas(self, shares: Mapping[int, float]) -> set[int]:
        """New replica counts from the pool-wide shares (``HeavyHitters.hot`` or
        ``hotness.merge_shares``); returns the keys whose count changed."""
        members = self.placement.members
        if self.cfg.replica_budget <= 0 or len(members) <= 1:
            new: dict[int, int] = {}
        else:
            self.planner.budget_tokens = int(self.cfg.replica_budget * sum(members.values()))
            new = self.planner.plan(shares, len(members))
        old = self.copies
        changed = {k for k in set(new) | set(old) if new.get(k, 1) != old.get(k, 1)}
        self.copies = new
        return changed

    # -- eviction --------------------------------------------------------------------

    def keep_last_copy(self, has_cached_children: bool, other_holders: int) -> bool:
        """Pool-wide leaf-first: pass over this copy (evict another) when it is the
        segment's last copy and some child segment is cached somewhere."""
        return self.cfg.pool_leaf_first and has_cached_children and other_holders == 0

    def spill_to(self, age: float, horizons: Mapping[str, float], hops: int = 0) -> str | None:
        """Where the last copy of a segment last used ``age`` ago, and handed over ``hops``
        times since, goes instead of leaving the pool: the member of ``horizons`` (the
        others, same clock) with the largest horizon, when that is more than
        ``spill_margin`` times ``age`` (ties: smallest id); else None, and None once
        ``hops`` reaches ``spill_hops``. Each hand-over moves a segment to older data than
        its own, so a chain of them ends; the hop limit ends it sooner for data nobody
        uses, which would otherwise push older data on at every step."""
        m = self.cfg.spill_margin
        if m <= 0 or not horizons or 0 < self.cfg.spill_hops <= hops:
            return None
        top = max(horizons.values())
        if not top > m * max(age, 0.0):
            return None
        return min(w for w, h in horizons.items() if h == top)

    # -- dispatch --------------------------------------------------------------------

    def dispatch(self, keys: Sequence[int], locations: Mapping[int, Collection[str]],
                 loads: Mapping[str, float], *, executor: str, new_tokens: int,
                 expected_output_tokens: int, costs: Costs | None = None,
                 shape: ModelShape | None = None, pin: Mode | None = None) -> list[Assignment]:
        """Replica and mode for each of a request's cached segments (see ``dispatch.plan``);
        ``pin`` overrides ``remote_mode`` (a worker that cannot ship pulls)."""
        return plan(keys, locations, loads, executor=executor, new_tokens=new_tokens,
                    expected_output_tokens=expected_output_tokens,
                    segment_size=self.segment_size, shape=shape or self.shape,
                    costs=costs or self.costs,
                    pin=pin if pin is not None else self.cfg.pinned_mode)
