"""A prefix cache of chained block keys with LRU eviction, leaves first.

Every access touches a request's blocks deepest first, so a block is never
older than any of its descendants and the least recently used entry is always
a leaf: evicting from the front never strands a descendant whose ancestor is
gone (within one cache). This is SGLang's radix-tree LRU at block granularity.

A block can also arrive with an age (``place``: a segment another instance spilled,
``SimConfig.policy.spill_margin``): it takes its place among the older entries, as
the live receiver of a spill sets its last access to the sender's.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Optional

from sglang_tokenlake.eviction import AwareCache
from sglang_tokenlake.policy import PolicyConfig


def new_cache(capacity: int, policy: PolicyConfig | None = None) -> PrefixLRU | AwareCache:
    """A block cache of ``capacity`` evicting in ``policy.eviction`` order (default LRU)."""
    if policy is None or policy.eviction == "lru":
        return PrefixLRU(capacity)
    return AwareCache(capacity, policy.aware)


class PrefixLRU:
    """Up to ``capacity`` blocks (keys), least recently used first.

    Touched keys live in an ``OrderedDict`` in the order of their stamps; a key placed
    at a stamp older than the newest entry's (``place``) waits in a sorted list beside
    it, and every read merges the two (stamp ties: the placed key is older). A key
    placed at a stamp at least the newest one's is simply appended.
    """

    __slots__ = ("capacity", "_od", "_aged", "_aged_at", "_seq")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._od: OrderedDict[int, float | None] = OrderedDict()
        self._aged: list[tuple[float, int, int]] = []  # (stamp, seq, key), sorted; stale kept
        self._aged_at: dict[int, int] = {}  # key -> seq of its live entry in _aged
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._od) + len(self._aged_at)

    def __contains__(self, key: int) -> bool:
        return key in self._od or key in self._aged_at

    def match(self, keys: Sequence[int]) -> int:
        """How many leading ``keys`` are cached."""
        od, aged, n = self._od, self._aged_at, 0
        for k in keys:
            if k not in od and k not in aged:
                break
            n += 1
        return n

    def use(self, keys: Sequence[int]) -> list[int]:
        """Touch or insert all ``keys`` (a request's full blocks); return the evicted keys."""
        od, aged = self._od, self._aged_at
        for k in reversed(keys):
            if aged:
                aged.pop(k, None)
            od[k] = None
            od.move_to_end(k)
        return self.overflow()

    def touch(self, key: int, stamp: float = 0.0, parent: Optional[int] = None,
              depth: int = 0) -> None:
        """Mark ``key`` (present or not) most recently used at ``stamp`` (a clock shared
        by the caches that compare ages); callers go deepest first. ``parent`` and
        ``depth`` (its chain) are for ``AwareCache``; recency alone keeps LRU leaf-first."""
        if self._aged_at:
            self._aged_at.pop(key, None)
        self._od[key] = stamp
        self._od.move_to_end(key)

    def place(self, key: int, stamp: float, parent: Optional[int] = None,
              depth: int = 0) -> None:
        """Insert ``key`` (absent) as last used at ``stamp``, which may be older than
        entries already here: it is evicted in that order, after the entries older
        than it and before the newer ones."""
        od = self._od
        if key in self:
            raise ValueError(f"key {key} is cached already")
        newest = next(reversed(od.values())) if od else None
        if newest is None or stamp >= newest:  # the newest: a plain touch
            od[key] = stamp
            return
        seq = next(self._seq)
        bisect.insort(self._aged, (stamp, seq, key))
        self._aged_at[key] = seq

    def _aged_head(self) -> Optional[tuple[float, int, int]]:
        """The oldest live placed entry (stale ones before it are dropped)."""
        aged, at = self._aged, self._aged_at
        i = 0
        while i < len(aged) and at.get(aged[i][2]) != aged[i][1]:
            i += 1
        if i:
            del aged[:i]
        return aged[0] if aged else None

    def _oldest(self) -> Iterator[tuple[int, float]]:
        """``(key, stamp)``, least recently used first (stop before changing the cache)."""
        od = self._od
        if not self._aged_at:
            yield from od.items()
            return
        at = self._aged_at
        self._aged_head()
        placed = ((k, s) for s, q, k in self._aged if at.get(k) == q)
        it = iter(od.items())
        a, b = next(placed, None), next(it, None)
        while a is not None or b is not None:
            if b is None or (a is not None and a[1] <= b[1]):
                yield a
                a = next(placed, None)
            else:
                yield b
                b = next(it, None)

    def oldest_stamp(self) -> float:
        """Stamp of the least recently used key; -inf while the cache has free room, +inf
        when it has no room at all (running requests hold all its memory)."""
        if self.capacity <= 0:
            return float("inf")
        od, n = self._od, len(self._od) + len(self._aged_at)
        if n < self.capacity or not n:
            return float("-inf")
        if not self._aged_at:
            return next(iter(od.values()))
        head = self._aged_head()
        first = next(iter(od.values())) if od else None
        if head is None or (first is not None and first < head[0]):
            return first
        return head[0]

    def discard(self, key: int) -> None:
        self._od.pop(key, None)
        self._aged_at.pop(key, None)

    def overflow(self, keep: Callable[[int], bool] | None = None, scan: int = 64,
                 dropped: Callable[[int, float], None] | None = None) -> list[int]:
        """Evict least recently used keys until within capacity; return them.

        With ``keep``, a key for which ``keep(key)`` is true is passed over (it stays,
        in its place) while one of the next ``scan`` oldest keys can go instead.
        ``dropped(key, stamp)`` is called for each evicted key as it goes, before the
        next one is chosen (so ``keep`` can see it gone).
        """
        od, out = self._od, []
        while len(self) > self.capacity:
            if keep is None and not self._aged_at:
                k, s = od.popitem(last=False)
            else:
                first = victim = None
                for i, (k, s) in enumerate(self._oldest()):
                    if first is None:
                        first = (k, s)
                    if keep is None or not keep(k):
                        victim = (k, s)
                        break
                    if i + 1 >= scan:
                        break
                k, s = victim or first
                self.discard(k)
            out.append(k)
            if dropped is not None:
                dropped(k, s)
        if len(self._aged) > 2 * len(self._aged_at) + 64:  # drop stale entries
            self._aged = [x for x in self._aged if self._aged_at.get(x[2]) == x[1]]
        return out

    def keys(self) -> list[int]:
        """Cached keys, least recently used first."""
        return [k for k, _ in self._oldest()]
