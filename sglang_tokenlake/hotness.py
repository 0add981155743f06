"""Which segments are hot, and how many replicas each hot segment gets.

``SpaceSaving`` is the streaming top-k counter of Metwally, Agrawal & El Abbadi
(ICDT 2005): ``k`` counters; an unmonitored key takes over the smallest counter
and inherits its count as its error bound. After ``n`` observations every key
seen more than ``n / k`` times is monitored, and each estimate overcounts by at
most ``n / k`` (its recorded ``error``).

``HeavyHitters`` slides that over the last ``window`` observations with a
*jumping window*: ``buckets`` sub-windows of ``window / buckets`` observations,
each with its own ``SpaceSaving(k)``; a full sub-window is sealed, and the oldest
is dropped when a new one opens. Estimates sum over the live sub-windows, so
they cover between ``window * (1 - 1/buckets)`` and ``window`` observations and
overcount by at most ``window / k``. A key that stops being accessed is gone
after ``window`` more observations: that is how hot segments cool down.

``ReplicaPlanner`` turns shares into replica counts under a capacity budget by
water-filling: one extra replica at a time goes to the segment whose load per
replica (``share / replicas``) is highest, until every replica's share is within
``headroom / num_workers`` (``headroom`` of a worker's fair share) or the budget
(tokens that replicas may occupy) runs out. That minimizes the largest
per-replica share for the budget spent (each step lowers the current maximum).

Plain Python: no torch, sglang or zmq.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import Optional


class SpaceSaving:
    """Space-Saving top-k frequency counter (``k`` counters, O(log k) per observation)."""

    def __init__(self, k: int) -> None:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        self.k = k
        self.total = 0
        self._count: dict[Hashable, int] = {}
        self._error: dict[Hashable, int] = {}
        # Min-heap of (count, seq, key) with stale entries skipped lazily; seq keeps
        # the order total (and evicts the older of two equal counters first).
        self._heap: list[tuple[int, int, Hashable]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._count

    def _push(self, key: Hashable, count: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (count, self._seq, key))
        if len(self._heap) > 4 * self.k + 64:  # drop stale entries now and then
            self._heap = [(c, s, k) for c, s, k in self._heap if self._count.get(k) == c]
            heapq.heapify(self._heap)

    def _pop_min(self) -> tuple[Hashable, int]:
        while True:
            c, _, key = heapq.heappop(self._heap)
            if self._count.get(key) == c:
                return key, c

    def observe(self, key: Hashable, count: int = 1) -> None:
        """Count ``count`` occurrences of ``key``."""
        self.total += count
        c = self._count.get(key)
        if c is not None:
            self._count[key] = c + count
        elif len(self._count) < self.k:
            self._count[key] = count
            self._error[key] = 0
        else:
            victim, floor = self._pop_min()
            del self._count[victim]
            del self._error[victim]
            self._count[key] = floor + count
            self._error[key] = floor
        self._push(key, self._count[key])

    def estimate(self, key: Hashable) -> tuple[int, int]:
        """``(count, error)``: the true count lies in ``[count - error, count]``; (0, 0) if unmonitored."""
        c = self._count.get(key)
        return (0, 0) if c is None else (c, self._error[key])

    def items(self) -> list[tuple[Hashable, int, int]]:
        """Monitored ``(key, count, error)``, highest count first."""
        return sorted(
            ((k, c, self._error[k]) for k, c in self._count.items()), key=lambda t: -t[1]
        )


class HeavyHitters:
    """Top-k segments over a sliding window of the last ``window`` observations.

    Args:
        window: observations the estimate covers (e.g. segment accesses).
        k: counters per sub-window; shares below ``1/k`` cannot be told apart.
        buckets: sub-windows (granularity of the slide).
        min_share: the share at which a key counts as hot (default ``2/k``, above
            the estimator's noise floor of ``1/k``).
    """

    def __init__(
        self, window: int, k: int, buckets: int = 4, min_share: Optional[float] = None
    ) -> None:
        if window <= 0 or buckets <= 0 or window < buckets:
            raise ValueError("window and buckets must be positive, window >= buckets")
        self.window = window
        self.k = k
        self.buckets = buckets
        self.min_share = 2.0 / k if min_share is None else min_share
        self._span = math.ceil(window / buckets)
        self._sealed: deque[SpaceSaving] = deque()
        self._current = SpaceSaving(k)

    def observe(self, key: Hashable, count: int = 1) -> None:
        """Record one access to ``key`` (``count`` accesses)."""
        if self._current.total >= self._span:
            self._sealed.append(self._current)
            if len(self._sealed) >= self.buckets:
                self._sealed.popleft()
            self._current = SpaceSaving(self.k)
        self._current.observe(key, count)

    def _parts(self) -> list[SpaceSaving]:
        return [*self._sealed, self._current]

    @property
    def observed(self) -> int:
        """Observations inside the current window."""
        return sum(p.total for p in self._parts())

    def count(self, key: Hashable) -> int:
        """Estimated accesses to ``key`` in the window (an overestimate by at most ``window/k``)."""
        return sum(p.estimate(key)[0] for p in self._parts())

    def share(self, key: Hashable) -> float:
        """Estimated fraction of the window's accesses that went to ``key``."""
        n = self.observed
        return self.count(key) / n if n else 0.0

    def hot(self, min_share: Optional[float] = None) -> dict[Hashable, float]:
        """Keys whose estimated share is at least ``min_share``: key -> share, hottest first."""
        threshold = self.min_share if min_share is None else min_share
        n = self.observed
        if not n:
            return {}
        totals: dict[Hashable, int] = {}
        for p in self._parts():
            for key, c, _ in p.items():
                totals[key] = totals.get(key, 0) + c
        out = [(k, c / n) for k, c in totals.items() if c / n >= threshold]
        out.sort(key=lambda kv: -kv[1])
        return dict(out)


class ReplicaPlanner:
    """Replica counts for hot segments, in proportion to their share, within a token budget.

    Args:
        budget_tokens: KV tokens (summed over the pool) that extra replicas may occupy.
        segment_size: tokens per segment (each extra replica costs this many).
        headroom: target per-replica share as a fraction of a worker's fair share
            ``1/num_workers``; 0.5 means a replica should carry at most half of it.
        max_replicas: cap per segment (default: the number of workers).
    """

    def __init__(
        self,
        budget_tokens: int,
        segment_size: int,
        *,
        headroom: float = 0.5,
        max_replicas: Optional[int] = None,
    ) -> None:
        if segment_size <= 0 or headroom <= 0 or budget_tokens < 0:
            raise ValueError("segment_size and headroom must be positive, budget >= 0")
        self.budget_tokens = budget_tokens
        self.segment_size = segment_size
        self.headroom = headroom
        self.max_replicas = max_replicas

    def wanted(self, share: float, num_workers: int) -> int:
        """Replicas that bring ``share`` per replica down to ``headroom / num_workers`` (>= 1)."""
        cap = min(num_workers, self.max_replicas or num_workers)
        return max(1, min(cap, math.ceil(share * num_workers / self.headroom - 1e-9)))

    def plan(self, shares: Mapping[Hashable, float], num_workers: int) -> dict[Hashable, int]:
        """Total copies (primary included) for each segment that gets extra replicas.

        Segments absent from the result keep exactly one copy (their primary home).
        Cost: ``sum(copies - 1) * segment_size <= budget_tokens``.
        """
        if num_workers <= 1:
            return {}
        budget = self.budget_tokens // self.segment_size  # extra replicas we can afford
        want = {k: self.wanted(s, num_workers) for k, s in shares.items() if s > 0}
        heap = [(-s, 1, i, k) for i, (k, s) in enumerate(shares.items()) if want.get(k, 1) > 1]
        heapq.heapify(heap)
        copies: dict[Hashable, int] = {}
        while heap and budget > 0:
            neg_per, r, i, key = heapq.heappop(heap)
            r += 1
            copies[key] = r
            budget -= 1
            if r < want[key]:
                heapq.heappush(heap, (neg_per * (r - 1) / r, r, i, key))
        return copies


HotView = tuple[Mapping[Hashable, int], int]
"""One observer's heavy hitters: (key -> estimated accesses, accesses observed)."""


def top_view(hh: HeavyHitters, n: int) -> HotView:
    """The ``n`` most accessed keys of ``hh`` with their counts, and the accesses it covers
    (what a live member sends with its heartbeats)."""
    totals: dict[Hashable, int] = {}
    for p in hh._parts():
        for key, c, _ in p.items():
            totals[key] = totals.get(key, 0) + c
    top = heapq.nlargest(n, totals.items(), key=lambda kv: kv[1])
    return dict(top), hh.observed


def merge_shares(views: Sequence[HotView], min_share: float) -> dict[Hashable, float]:
    """Pool-wide shares from several observers' views: summed counts over summed
    observations; keys at or above ``min_share``, hottest first."""
    total = sum(max(int(n), 0) for _, n in views)
    if total <= 0:
        return {}
    counts: dict[Hashable, int] = {}
    for c, _ in views:
        for key, x in c.items():
            counts[key] = counts.get(key, 0) + int(x)
    out = [(k, x / total) for k, x in counts.items() if x / total >= min_share]
    out.sort(key=lambda kv: -kv[1])
    return dict(out)
