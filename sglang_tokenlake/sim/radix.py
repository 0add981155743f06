"""SGLang's radix tree at block granularity: whole nodes evicted, running prefixes locked.

``PrefixLRU`` evicts single blocks, so a context squeezed by running requests keeps
its first blocks and the next request still hits part of it. SGLang's ``RadixCache``
evicts whole leaf nodes (least recently used first) until it has freed what an
allocation needs, and a node is one stretch of tokens inserted together: a node ends
where two inserted prompts diverge, where a prompt extends a cached prefix, and where
a chunk of a chunked prefill ended (SGLang inserts the prompt so far after each chunk).
A context whose first request prefilled it in 4,096-token chunks is then two nodes,
and pressure takes its deep node whole: the next request hits 4,096 tokens or nothing.
A running request locks its prefix (``lock``/``unlock``): locked nodes are never
evicted, as SGLang's ``lock_ref``.

``RadixNodeLRU`` has ``PrefixLRU``'s surface as the per-instance baselines use it
(``match``, ``use``, ``capacity``, ``overflow``, ``in``, ``len``), counted in blocks.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Optional


class Node:
    __slots__ = ("keys", "parent", "children", "stamp", "lock", "id")

    def __init__(self, keys: list[int], parent: Optional[Node], stamp: int, nid: int) -> None:
        self.keys = keys
        self.parent = parent
        self.children: dict[int, Node] = {}
        self.stamp = stamp
        self.lock = 0
        self.id = nid


class RadixNodeLRU:
    """Up to ``capacity`` blocks in a radix tree of chained block keys.

    ``chunk_blocks`` (> 0): a prompt inserted by ``use`` gets a node boundary every
    ``chunk_blocks`` blocks after its cached prefix (SGLang's chunked prefill, in
    blocks); 0: one node for the whole new part.
    """

    def __init__(self, capacity: int, chunk_blocks: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if chunk_blocks < 0:
            raise ValueError(f"chunk_blocks must be >= 0, got {chunk_blocks}")
        self.capacity = capacity
        self.chunk_blocks = chunk_blocks
        self._ids = itertools.count(1)
        self.root = Node([], None, 0, 0)  # never on the heap (``_push``)
        self._node_of: dict[int, Node] = {}  # block key -> its node
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, Node]] = []  # (stamp, id, node): leaf candidates, lazy
        self.evicted_nodes = 0

    def __len__(self) -> int:
        return len(self._node_of)

    def __contains__(self, key: int) -> bool:
        return key in self._node_of

    # -- lookup ----------------------------------------------------------------

    def _walk(self, keys: Sequence[int]) -> tuple[list[Node], int, int]:
        """(nodes on the matched path, blocks matched, blocks matched in the last node)."""
        path, n, node = [], 0, self.root
        while n < len(keys):
            child = node.children.get(keys[n])
            if child is None:
                break
            k = 0
            ck = child.keys
            while k < len(ck) and n + k < len(keys) and ck[k] == keys[n + k]:
                k += 1
            path.append(child)
            n += k
            if k < len(ck):
                return path, n, k
            node = child
        return path, n, len(path[-1].keys) if path else 0

    def match(self, keys: Sequence[int]) -> int:
        """How many leading ``keys`` are cached."""
        return self._walk(keys)[1]

    # -- insert ----------------------------------------------------------------

    def _split(self, node: Node, k: int) -> Node:
        """Split ``node`` after its first ``k`` keys; return the new upper node."""
        upper = Node(node.keys[:k], node.parent, node.stamp, next(self._ids))
        upper.lock = node.lock
        node.parent.children[upper.keys[0]] = upper
        node.keys = node.keys[k:]
        node.parent = upper
        upper.children[node.keys[0]] = node
        for key in upper.keys:
            self._node_of[key] = upper
        return upper

    def use(self, keys: Sequence[int]) -> list[int]:
        """Touch the cached prefix of ``keys`` and insert the rest (a request's full
        blocks; its prefill chunks count from the cached prefix); return the evicted keys."""
        path, n, k = self._walk(keys)
        stamp = next(self._clock)
        if path and k < len(path[-1].keys):  # the match ends inside a node: split it there
            path[-1] = self._split(path[-1], k)
        for node in path:
            node.stamp = stamp
        parent = path[-1] if path else self.root
        if n < len(keys):
            cuts = self._cuts(n, len(keys))
            for lo, hi in zip(cuts, cuts[1:]):
                child = Node(list(keys[lo:hi]), parent, stamp, next(self._ids))
                parent.children[keys[lo]] = child
                for key in child.keys:
                    self._node_of[key] = child
                parent = child
        self._push(parent)
        return self.overflow()

    def _cuts(self, n: int, end: int) -> list[int]:
        """Node boundaries of blocks ``[n, end)`` prefilled in chunks from block ``n``."""
        step = self.chunk_blocks or end - n
        return [*range(n, end, step), end]

    # -- locks -----------------------------------------------------------------

    def lock(self, keys: Sequence[int]) -> Optional[Node]:
        """Lock the cached prefix of ``keys`` (a running request's); return the handle
        for ``unlock`` (None: nothing cached)."""
        path, n, k = self._walk(keys)
        if not path:
            return None
        last = path[-1]
        if k < len(last.keys):
            self._split(last, k)
            last = last.parent
        node: Optional[Node] = last
        while node is not None and node is not self.root:
            node.lock += 1
            node = node.parent
        return last

    def unlock(self, handle: Optional[Node]) -> None:
        node = handle
        while node is not None and node is not self.root:
            node.lock -= 1
            if node.lock < 0:
                raise RuntimeError("radix node unlocked more often than locked")
            if node.lock == 0 and not node.children:
                self._push(node)
            node = node.parent

    # -- eviction --------------------------------------------------------------

    def _push(self, node: Node) -> None:
        if node is not self.root and not node.children:
            heapq.heappush(self._heap, (node.stamp, node.id, node))

    def _evictable(self, stamp: int, node: Node) -> bool:
        return (node.parent is not None and not node.children and node.lock == 0
                and node.stamp == stamp)

    def overflow(self) -> list[int]:
        """Evict least recently used unlocked leaf nodes, whole, until within capacity;
        return the evicted keys (possibly more than the excess)."""
        out: list[int] = []
        heap = self._heap
        while len(self._node_of) > self.capacity and heap:
            stamp, _, node = heapq.heappop(heap)
            if not self._evictable(stamp, node):  # stale: touched, grown, locked or gone
                continue
            parent = node.parent
            del parent.children[node.keys[0]]
            node.parent = None
            for key in node.keys:
                del self._node_of[key]
            out.extend(node.keys)
            self.evicted_nodes += 1
            if parent.lock == 0:
                self._push(parent)
        if len(heap) > 4 * len(self._node_of) + 64:  # drop stale entries
            self._heap = [e for e in heap if self._evictable(e[0], e[2])]
            heapq.heapify(self._heap)
        return out
