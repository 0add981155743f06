"""``belady``: the offline bound, the deduplicated pool evicting what is reused furthest ahead.

One deduplicated cache with the cluster's total capacity (like ``limit``) that knows the
future: it evicts the cached leaf (prefix-constrained: a block without cached children)
whose next use is furthest away, never-again first (Belady's MIN). No online policy that
must cache every block it serves keeps more of the future's hits, so it bounds ``lru``
and ``aware`` from above. ``prepare`` precomputes each key's uses (request indices).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from sglang_tokenlake.eviction import AwareCache, _Entry
from sglang_tokenlake.sim.model import Outcome
from sglang_tokenlake.sim.policies import Limit
from sglang_tokenlake.sim.workloads import Request

_NEVER = float("inf")


class BeladyCache(AwareCache):
    """Leaf-first cache evicting the leaf with the furthest ``next_use`` first."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.next_use: dict[int, float] = {}

    def priority(self, key: int, e: _Entry) -> float:
        return -self.next_use.get(key, _NEVER)


class Belady(Limit):
    name = "belady"

    def __init__(self, cfg, cluster) -> None:
        super().__init__(cfg, cluster)
        self.cache = BeladyCache(cfg.capacity_blocks * cfg.instances)
        self._uses: dict[int, deque[int]] = {}
        self._n = 0

    def prepare(self, requests: Sequence[Request]) -> None:
        """Learn the future: the request indices where each full block is used."""
        uses: dict[int, deque[int]] = {}
        for i, r in enumerate(requests):
            for k in self.full(r):
                q = uses.get(k)
                if q is None:
                    uses[k] = q = deque()
                q.append(i)
        self._uses = uses

    def serve(self, req: Request, now: float) -> Outcome:
        full = self.full(req)
        nxt, uses, i = self.cache.next_use, self._uses, self._n
        self._n += 1
        for k in full:
            q = uses.get(k)
            while q and q[0] <= i:
                q.popleft()
            nxt[k] = q[0] if q else _NEVER
        return super().serve(req, now)
