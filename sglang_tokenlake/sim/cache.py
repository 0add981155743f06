"""A prefix cache of chained block keys with LRU eviction, leaves first.

Every access touches a request's blocks deepest first, so a block is never
older than any of its descendants and the least recently used entry is always
a leaf: evicting from the front never strands a descendant whose ancestor is
gone (within one cache). This is SGLang's radix-tree LRU at block granularity.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Optional

from sglang_tokenlake.eviction import AwareCache
from sglang_tokenlake.policy import PolicyConfig


def new_cache(capacity: int, policy: PolicyConfig | None = None) -> PrefixLRU | AwareCache:
    """A block cache of ``capacity`` evicting in ``policy.eviction`` order (default LRU)."""
    if policy is None or policy.eviction == "lru":
        return PrefixLRU(capacity)
    return AwareCache(capacity, policy.aware)


class PrefixLRU:
    """Up to ``capacity`` blocks (keys), least recently used first."""

    __slots__ = ("capacity", "_od")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._od: OrderedDict[int, float | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._od)

    def __contains__(self, key: int) -> bool:
        return key in self._od

    def match(self, keys: Sequence[int]) -> int:
        """How many leading ``keys`` are cached."""
        od, n = self._od, 0
        for k in keys:
            if k not in od:
                break
            n += 1
        return n

    def use(self, keys: Sequence[int]) -> list[int]:
        """Touch or insert all ``keys`` (a request's full blocks); return the evicted keys."""
        od = self._od
        for k in reversed(keys):
            od[k] = None
            od.move_to_end(k)
        return self.overflow()

    def touch(self, key: int, stamp: float = 0.0, parent: Optional[int] = None,
              depth: int = 0) -> None:
        """Mark ``key`` (present or not) most recently used at ``stamp`` (a clock shared
        by the caches that compare ages); callers go deepest first. ``parent`` and
        ``depth`` (its chain) are for ``AwareCache``; recency alone keeps LRU leaf-first."""
        self._od[key] = stamp
        self._od.move_to_end(key)

    def oldest_stamp(self) -> float:
        """Stamp of the least recently used key; -inf while the cache has free room, +inf
        when it has no room at all (running requests hold all its memory)."""
        if self.capacity <= 0:
            return float("inf")
        if len(self._od) < self.capacity or not self._od:
            return float("-inf")
        return next(iter(self._od.values()))

    def discard(self, key: int) -> None:
        self._od.pop(key, None)

    def overflow(self, keep: Callable[[int], bool] | None = None, scan: int = 64) -> list[int]:
        """Evict least recently used keys until within capacity; return them.

        With ``keep``, a key for which ``keep(key)`` is true is passed over (it stays,
        in its place) while one of the next ``scan`` oldest keys can go instead.
        """
        od, out = self._od, []
        while len(od) > self.capacity:
            if keep is None:
                out.append(od.popitem(last=False)[0])
                continue
            victim = None
            for i, k in enumerate(od):
                if i >= scan:
                    break
                if not keep(k):
                    victim = k
                    break
            if victim is None:
                victim = next(iter(od))
            del od[victim]
            out.append(victim)
        return out

    def keys(self) -> list[int]:
        """Cached keys, least recently used first."""
        return list(self._od)
