"""Eviction orders of a prefix cache: ``lru`` and ``aware``, shared by the simulator and the tree.

``lru``    least recently used leaf first (SGLang's radix-tree rule).
``aware``  a recency/frequency/cost score (GDSF-like, on the cache's own clock)::

               priority = stamp + life * (freq_weight * log2(freq) + depth_weight * log2(1 + depth))

           ``stamp``: the clock at the segment's last use; ``freq``: its uses, remembered for
           a while after it is evicted (a ghost list as long as the cache), so a segment that
           comes back proves its reuse; ``depth``: the segment's index in its prompt (its
           recompute cost grows with the attention span); ``life``: the cache's current
           *eviction horizon* (how long ago the victims were last used), so the bonus is in
           units of "extra lifetimes" and does not depend on the clock's scale. The lowest
           priority goes first; ties: older stamp first.

Both are leaf-first: only a segment without cached children may go (a segment is useless
without its ancestors), so a segment's cached descendants protect it, and every use of a
descendant is a use of the ancestor too (it is touched with the whole prefix).

``AwareCache`` is the simulator's block cache with this order (the same interface as
``sim.cache.PrefixLRU``): a heap of the evictable leaves with lazy invalidation, O(log n)
per use and eviction, no scan of the cache. ``SegmentTree`` keeps its evictable leaves in
a ``LeafHeap`` (the same idea over tree nodes) ordered by ``order_key``, which uses
``aware_priority`` too.

Plain Python: no torch, sglang or zmq.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

EVICTIONS = ("lru", "aware")
"""The eviction orders a pool can use."""


@dataclass(frozen=True)
class AwareParams:
    """Weights of the ``aware`` score (tuned on the first half of the Mooncake traces)."""

    freq_weight: float = 2.0
    """Extra lifetimes per doubling of a segment's uses."""
    depth_weight: float = 0.0
    """Extra lifetimes per doubling of the segment's depth (recompute cost)."""

    def __post_init__(self) -> None:
        if self.freq_weight < 0:
            raise ValueError("freq_weight must be >= 0")


def check_eviction(name: str) -> str:
    if name not in EVICTIONS:
        raise ValueError(f"unknown eviction {name!r}; choose from {EVICTIONS}")
    return name


def aware_priority(stamp: float, freq: int, depth: int, life: float,
                   params: AwareParams = AwareParams()) -> float:
    """The ``aware`` priority of a segment (lowest goes first)."""
    bonus = params.freq_weight * math.log2(max(freq, 1))
    if params.depth_weight:
        bonus += params.depth_weight * math.log2(1 + max(depth, 0))
    return stamp + max(life, 1.0) * bonus


def order_key(eviction: str, life: float,
              params: AwareParams = AwareParams()) -> Callable[[Any], tuple]:
    """Sort key of ``SegmentTree`` leaves (transient copies first, then by ``eviction``);
    the ``aware`` key is ``aware_priority`` of (last use, uses = hits + 1, depth)."""
    if check_eviction(eviction) == "lru":
        return lambda n: (n.designated, n.last_access, n.id)
    if params.depth_weight:
        return lambda n: (n.designated, aware_priority(n.last_access, n.hits + 1, n.depth, life,
                                                       params), n.last_access, n.id)
    w, lg = max(life, 1.0) * params.freq_weight, math.log2  # the same sum, inlined
    return lambda n: (n.designated, n.last_access + w * lg(n.hits + 1), n.last_access, n.id)


class _Entry:
    __slots__ = ("stamp", "freq", "depth", "parent", "kids", "ver")

    def __init__(self, stamp: float, freq: int, depth: int, parent: Optional[int]) -> None:
        self.stamp, self.freq, self.depth, self.parent = stamp, freq, depth, parent
        self.kids = 0  # cached children in this cache
        self.ver = 0  # sequence number of its live heap entry (0: none)


class AwareCache:
    """Up to ``capacity`` blocks, evicted leaf-first in ``aware`` order (see the module)."""

    def __init__(self, capacity: int, params: AwareParams = AwareParams()) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.params = params
        self.clock = 0.0
        self.life = float(max(capacity, 1))  # eviction horizon (moving average)
        self._d: dict[int, _Entry] = {}
        self._pending: dict[int, int] = {}  # cached children of keys not (yet) cached here
        self._ghost: OrderedDict[int, int] = OrderedDict()  # evicted key -> uses
        self._heap: list[tuple[float, float, int, int]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: int) -> bool:
        return key in self._d

    def priority(self, key: int, e: _Entry) -> float:
        return aware_priority(e.stamp, e.freq, e.depth, self.life, self.params)

    def _push(self, key: int, e: _Entry) -> None:
        self._seq += 1
        e.ver = self._seq
        heapq.heappush(self._heap, (self.priority(key, e), e.stamp, self._seq, key))
        if len(self._heap) > 4 * len(self._d) + 64:
            self._compact()

    def _compact(self) -> None:
        d = self._d
        self._heap = [x for x in self._heap if (e := d.get(x[3])) is not None and e.ver == x[2]]
        heapq.heapify(self._heap)

    def match(self, keys: Sequence[int]) -> int:
        """How many leading ``keys`` are cached."""
        d, n = self._d, 0
        for k in keys:
            if k not in d:
                break
            n += 1
        return n

    def use(self, keys: Sequence[int]) -> list[int]:
        """Touch or insert a request's full blocks ``keys``; return the evicted keys."""
        self.clock += 1
        for i in range(len(keys) - 1, -1, -1):
            self.touch(keys[i], self.clock, keys[i - 1] if i else None, i)
        return self.overflow()

    def touch(self, key: int, stamp: float = 0.0, parent: Optional[int] = None,
              depth: int = 0) -> None:
        """Use ``key`` (present or not) at ``stamp``; ``parent``: the key before it in its
        chain (leaf-first needs it; callers go deepest first)."""
        if stamp > self.clock:
            self.clock = stamp
        e = self._d.get(key)
        if e is None:
            e = _Entry(stamp, self._ghost.pop(key, 0) + 1, depth, parent)
            e.kids = self._pending.pop(key, 0)
            self._d[key] = e
            if parent is not None:
                p = self._d.get(parent)
                if p is not None:
                    p.kids += 1
                    p.ver = 0  # no longer a leaf
                else:
                    self._pending[parent] = self._pending.get(parent, 0) + 1
        else:
            e.stamp = stamp
            e.freq += 1
        if e.kids == 0:
            self._push(key, e)

    def place(self, key: int, stamp: float, parent: Optional[int] = None,
              depth: int = 0) -> None:
        """Insert ``key`` (absent) as last used at ``stamp``, which may be older than
        entries already here (a spilled segment; ``PrefixLRU.place``)."""
        if key in self._d:
            raise ValueError(f"key {key} is cached already")
        self.touch(key, stamp, parent, depth)

    def _top(self) -> Optional[tuple[float, float, int, int]]:
        heap, d = self._heap, self._d
        while heap:
            x = heap[0]
            e = d.get(x[3])
            if e is not None and e.ver == x[2]:
                return x
            heapq.heappop(heap)
        return None

    def oldest_stamp(self) -> float:
        """Last-use stamp of the next victim; -inf while the cache has free room, +inf
        when it has no room at all."""
        if self.capacity <= 0:
            return float("inf")
        if len(self._d) < self.capacity or not self._d:
            return float("-inf")
        x = self._top()
        return x[1] if x is not None else float("-inf")

    def discard(self, key: int) -> None:
        if key in self._d:
            self._remove(key, ghost=False)

    def _remove(self, key: int, ghost: bool = True) -> None:
        e = self._d.pop(key)
        if e.kids:  # dropped from the middle (replicas): its children wait for it
            self._pending[key] = e.kids
        if ghost:
            self._ghost[key] = e.freq
            if len(self._ghost) > max(self.capacity, 1):
                self._ghost.popitem(last=False)
        if e.parent is not None:
            p = self._d.get(e.parent)
            if p is not None:
                p.kids -= 1
                if p.kids == 0:
                    self._push(e.parent, p)
            else:
                left = self._pending.get(e.parent, 0) - 1
                if left > 0:
                    self._pending[e.parent] = left
                else:
                    self._pending.pop(e.parent, None)

    def overflow(self, keep: Callable[[int], bool] | None = None, scan: int = 64,
                 dropped: Callable[[int, float], None] | None = None) -> list[int]:
        """Evict in ``aware`` order until within capacity; return the evicted keys;
        ``dropped(key, stamp)`` is called for each as it goes (``PrefixLRU.overflow``).

        With ``keep``, a key for which ``keep(key)`` is true is passed over (it stays) while
        one of the first ``scan`` candidates can go instead; else the first of them goes
        (``PrefixLRU.overflow``'s rule). Passed-over keys wait beside the heap, in order,
        until the call ends.
        """
        out: list[int] = []
        heap = self._heap
        held: list[tuple[float, float, int, int]] = []  # passed over, best first
        while len(self._d) > self.capacity:
            x = self._top()
            while x is not None and keep is not None and len(held) < scan and keep(x[3]):
                held.append(heapq.heappop(heap))
                x = self._top()
            if x is None or len(held) >= scan:  # nothing else can go: the best passed-over
                if not held:
                    break
                x = held.pop(0)
            else:
                heapq.heappop(heap)
            self.life += (max(self.clock - x[1], 1.0) - self.life) / 64
            self._remove(x[3])
            out.append(x[3])
            if dropped is not None:
                dropped(x[3], x[1])
        for y in held:
            heapq.heappush(heap, y)
        return out

    def keys(self) -> list[int]:
        """Cached keys, next victims first (leaves only carry an order; the rest follow)."""
        leaves = sorted(x for x in self._heap if (e := self._d.get(x[3])) is not None
                        and e.ver == x[2])
        first = [x[3] for x in leaves]
        seen = set(first)
        return first + [k for k in self._d if k not in seen]


class LeafHeap:
    """A set of tree nodes in ``key`` order: the tree's evictable leaves.

    A heap with lazy invalidation: membership changes are O(1) (``add`` pushes a node
    that was not a member, ``discard`` only forgets it), and a node's entry keeps the
    key it had when pushed. A use only makes a node's key larger, so ``top`` compares
    the top entry with the node's key now and pushes it again where it grew; a caller
    that makes a member's key smaller (an older ``last_access``, a copy turned
    transient) calls ``push``, and the larger entry it leaves behind is skipped or, if
    it comes first, is still no later than the node's true place. Entries of nodes no
    longer members are dropped as they surface, and the heap is rebuilt when they
    outnumber the members, so each change costs O(log n) amortized, with no scan.
    ``key`` may be replaced (``aware``'s horizon moves): entries pushed under the old
    one are checked against the new one as they surface.
    """

    def __init__(self, key: Callable[[Any], tuple]) -> None:
        self.key = key
        self._members: set[Any] = set()
        self._heap: list[tuple[tuple, int, Any]] = []
        self._seq = 0

    def __contains__(self, node: Any) -> bool:
        return node in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self):
        return iter(self._members)

    def add(self, node: Any) -> None:
        if node not in self._members:
            self._members.add(node)
            self._push(node)

    def discard(self, node: Any) -> None:
        self._members.discard(node)

    def push(self, node: Any) -> None:
        """Re-file a member whose key may have become smaller."""
        if node in self._members:
            self._push(node)

    def _push(self, node: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (self.key(node), self._seq, node))
        if len(self._heap) > 2 * len(self._members) + 64:
            self._heap = [(self.key(n), i, n) for i, n in enumerate(self._members)]
            heapq.heapify(self._heap)

    def top(self) -> Any:
        """The member with the smallest key (None when empty); it stays a member."""
        heap, key = self._heap, self.key
        while heap:
            k, _, node = heap[0]
            if node not in self._members:
                heapq.heappop(heap)
                continue
            now = key(node)
            if now > k:  # used since it was pushed: file it where it is now
                self._seq += 1
                heapq.heapreplace(heap, (now, self._seq, node))
                continue
            return node
        return None

    def evict(self, count: int, drop: Callable[[Any], Any],
              keep: Optional[Callable[[Any], bool]] = None) -> int:
        """Drop up to ``count`` members, smallest key first; return how many.

        ``drop(node)`` drops one; the caller's bookkeeping removes it from this set and
        ``add``s its parent when that becomes a leaf. A node for which ``keep`` is true
        is passed over while any other can go, and dropped (in order) only after them.
        """
        kept: list[Any] = []
        done = 0
        while done < count:
            node = self.top()
            if node is None:
                if not kept:
                    break
                for n in kept:  # only passed-over nodes are left: drop them in order
                    self.push(n)
                kept, keep = [], None
                continue
            heapq.heappop(self._heap)
            if keep is not None and keep(node):
                kept.append(node)
                continue
            drop(node)
            done += 1
        for n in kept:
            self.push(n)
        return done
