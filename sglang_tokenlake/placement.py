"""Where segments live: weighted rendezvous (highest-random-weight) hashing.

Every worker computes the same homes for a segment from the same live member
set, without asking anyone. Weights are capacities (KV tokens offered to the
pool): a member with twice the capacity is home to about twice the segments.
A join or a leave moves only the segments whose top choice changed: a joining
member ``j`` takes about ``w_j / sum(w)`` of all segments (``1/N`` for equal
weights), each from whichever member held it; a leaving member's segments are
spread over the others and nothing else moves.

Score of member ``m`` for key ``k`` (weighted rendezvous, logarithmic method)::

    h = XXH3-64(k as 8 little-endian bytes; seed = XXH3-64(m))
    u = (h + 0.5) / 2**64                      # in (0, 1)
    score = -weight(m) / ln(u)

``-1/ln(u)`` of a uniform ``u`` is the reciprocal of an exponential variable, so
the member with the highest score is drawn with probability proportional to its
weight (Schindelhauer & Schomaker, "Weighted distributed hash tables", 2005).
The ``n`` highest scores are the segment's ``n`` homes (replicas), best first.

Plain Python + xxhash: the live workers (``pool/link.py`` through ``policy.PoolPolicy``) and the simulator
(``sim/``) call the same functions.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from functools import lru_cache

import xxhash

_TWO64 = float(1 << 64)

Members = Mapping[str, float]
"""Live member id (``"host:port"``) -> weight (KV tokens offered; > 0)."""


@lru_cache(maxsize=4096)
def _member_seed(member: str) -> int:
    return xxhash.xxh3_64_intdigest(member.encode("utf-8"))


def score(key: int, member: str, weight: float = 1.0) -> float:
    """The rendezvous score of ``member`` for segment ``key`` (higher wins)."""
    h = xxhash.xxh3_64_intdigest(key.to_bytes(8, "little"), _member_seed(member))
    u = (h + 0.5) / _TWO64  # in (0, 1)
    return -weight / math.log(u)


def _check(members: Members) -> None:
    if not members:
        raise ValueError("no live members")
    for m, w in members.items():
        if not w > 0:
            raise ValueError(f"member {m!r} has weight {w!r}; weights must be positive")


def _table(members: Members) -> list[tuple[str, int, float]]:
    return [(m, _member_seed(m), float(w)) for m, w in members.items()]


def _ranked(key: int, table: list[tuple[str, int, float]], n: int) -> list[str]:
    """The ``n`` best members of ``table`` for ``key``; the arithmetic of ``score`` inlined."""
    kb = key.to_bytes(8, "little")
    xxh, log = xxhash.xxh3_64_intdigest, math.log
    if n == 1:
        best, best_s = "", -1.0
        for m, seed, w in table:
            s = -w / log((xxh(kb, seed) + 0.5) / _TWO64)
            if s > best_s or (s == best_s and m < best):
                best, best_s = m, s
        return [best]
    if n <= 0:
        return []
    scored = [(w / log((xxh(kb, seed) + 0.5) / _TWO64), m) for m, seed, w in table]
    # w / ln(u) is -score: ascending order is best first, ties by member id.
    if n * 4 < len(scored):
        return [m for _, m in heapq.nsmallest(n, scored)]
    scored.sort()
    return [m for _, m in scored[:n]]


def homes(key: int, members: Members, n: int = 1) -> list[str]:
    """The ``n`` highest-scoring members for ``key`` (best first).

    Args:
        key: a 64-bit segment key.
        members: live member id -> weight (capacity in tokens); weights must be positive.
        n: how many homes (the first is the primary; more for replicas). At most
            ``len(members)`` are returned.

    Ties (probability ~2**-53) break by member id, so every caller agrees.
    """
    _check(members)
    return _ranked(key, _table(members), n)


def home(key: int, members: Members) -> str:
    """The primary home of ``key``: the one member that stores an unreplicated segment."""
    return homes(key, members, 1)[0]


def moved(keys: Iterable[int], before: Members, after: Members) -> list[int]:
    """The keys whose primary home differs between two member sets (what a join/leave moves)."""
    return [k for k in keys if home(k, before) != home(k, after)]


class Placement:
    """Homes for one member set, memoized per key.

    A worker builds one per membership version (``Membership.version``) and drops it
    when the live set changes; the simulator keeps one per cluster. The memo is bounded
    (``max_cached`` primary homes; beyond it the oldest half is dropped).
    """

    def __init__(self, members: Members, max_cached: int = 1 << 20) -> None:
        _check(members)
        self.members: dict[str, float] = dict(members)
        self._table = _table(members)
        self._max_cached = max_cached
        self._home: dict[int, str] = {}
        self._homes: dict[tuple[int, int], list[str]] = {}

    def __len__(self) -> int:
        return len(self.members)

    def home(self, key: int) -> str:
        """The primary home of ``key`` (memoized)."""
        h = self._home.get(key)
        if h is None:
            if len(self._home) >= self._max_cached:
                for k in list(self._home)[: self._max_cached // 2]:
                    del self._home[k]
            h = self._home[key] = _ranked(key, self._table, 1)[0]
        return h

    def homes(self, key: int, n: int) -> list[str]:
        """The ``n`` best homes of ``key`` (primary first); replicas live on ``[1:]``."""
        if n <= 1:
            return [self.home(key)][: max(n, 0)]
        h = self._homes.get((key, n))
        if h is None:
            if len(self._homes) >= self._max_cached:
                for k in list(self._homes)[: self._max_cached // 2]:
                    del self._homes[k]
            h = self._homes[(key, n)] = _ranked(key, self._table, n)
        return list(h)
