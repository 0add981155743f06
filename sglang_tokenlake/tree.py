"""The segment tree: the radix tree's replacement, one node per fixed-size segment.

::

    root ──key_0──▶ [seg 0] ──key_1──▶ [seg 1] ──key_2──▶ [seg 2]   (local: value = slots)
                      │
                      └─key_1'─▶ [seg 1']  (remote: value None, owners = {"w2"})

A node is one segment. Children are keyed by the next segment's chained key
(``segments.chain_key``), so a key names the whole prefix up to and including
its segment. A node knows its local slots (``value``, opaque here: the adapter
stores a tensor of KV slot ids), the other workers that hold a copy
(``owners``), a lock count (requests using it), and access statistics.

Sizes are counted in tokens: every local node holds exactly ``segment_size``.
Eviction is leaf-first over local nodes: a local node is evictable when no
request locks it and no local child hangs under it (a segment is useless
without its ancestors). Order: transient copies before designated ones, then
by ``eviction`` (``lru``: least recently used first, or ``aware``, see
``sglang_tokenlake.eviction``), ties by creation. In a pool, a local copy is
*designated* when this worker is one of the segment's homes (placement) and
*transient* otherwise (computed or pulled here, kept only while memory allows).

Every node is also indexed by key (``nodes``): other workers' announcements apply by key.

Plain Python: no torch, sglang or zmq. The tree never frees memory itself;
``evict`` returns the values it dropped and the caller frees them.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from sglang_tokenlake.eviction import AwareParams, LeafHeap, check_eviction, order_key
from sglang_tokenlake.segments import SegmentKey


class SegmentNode:
    __slots__ = ("key", "parent", "children", "depth", "tokens", "value", "owners", "nlocal",
                 "designated", "lock_ref", "last_access", "hits", "id", "spilled")

    def __init__(
        self, key: SegmentKey, parent: Optional[SegmentNode], depth: int, node_id: int
    ) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[SegmentKey, SegmentNode] = {}
        self.depth = depth  # segment index; the root is -1
        self.tokens: Optional[bytes] = None  # int64 bytes of the segment, when local
        self.value: Any = None  # local slots; None when not held here
        self.owners: set[str] = set()  # other workers holding a copy
        self.nlocal = 0  # children with a local copy (leaf test in O(1))
        self.designated = True  # this worker is a home of the segment
        self.lock_ref = 0
        self.last_access = 0
        self.hits = 0
        self.id = node_id
        # (times handed over by spilling, last_access when it arrived): the count holds
        # while last_access does, so a request's use resets it (``pool.spill``).
        self.spilled: Optional[tuple[int, int]] = None

    @property
    def is_local(self) -> bool:
        return self.value is not None

    def __repr__(self) -> str:
        return (
            f"SegmentNode(depth={self.depth}, key={self.key:#018x}, local={self.is_local}, "
            f"lock={self.lock_ref}, owners={sorted(self.owners)})"
        )


@dataclass
class InsertOutcome:
    """What ``SegmentTree.insert`` did, segment by segment.

    ``path[i]`` is the node of segment ``i``. ``adopted[i]`` is True when the
    caller's value for segment ``i`` became the node's value (the tree owns it
    now); False when the node already held a local copy, so the caller's value
    is a duplicate the caller must free.
    """

    path: list[SegmentNode] = field(default_factory=list)
    adopted: list[bool] = field(default_factory=list)

    @property
    def num_new(self) -> int:
        return sum(self.adopted)


class SegmentTree:
    """Segment nodes, local slots, locks and leaf-first LRU eviction."""

    def __init__(self, segment_size: int, eviction: str = "lru",
                 aware: Optional[AwareParams] = None) -> None:
        if segment_size <= 0:
            raise ValueError(f"segment_size must be positive, got {segment_size}")
        self.segment_size = segment_size
        self.eviction, self.aware = check_eviction(eviction), aware or AwareParams()
        self._ids = itertools.count()
        self.reset()

    # -- state ---------------------------------------------------------------

    def reset(self) -> None:
        self.root = SegmentNode(0, None, -1, next(self._ids))
        self.root.lock_ref = 1  # never evicted
        self.nodes: dict[SegmentKey, SegmentNode] = {}
        self._tick = 0
        self.local_nodes = 0
        self.locked_nodes = 0  # local nodes with lock_ref > 0
        # Evictable leaves in eviction order and by age; local transient copies.
        self._leaves = LeafHeap(order_key(self.eviction, 0.0, self.aware))
        self._ages = LeafHeap(lambda n: (n.last_access, n.id))
        self._transient: set[SegmentNode] = set()

    @property
    def cached_tokens(self) -> int:
        """Tokens held locally by the tree (locked or not)."""
        return self.local_nodes * self.segment_size

    @property
    def locked_tokens(self) -> int:
        return self.locked_nodes * self.segment_size

    @property
    def evictable_tokens(self) -> int:
        return (self.local_nodes - self.locked_nodes) * self.segment_size

    def _touch(self) -> int:
        self._tick += 1
        return self._tick

    # -- lookup --------------------------------------------------------------

    def walk(self, keys: Sequence[SegmentKey]) -> list[SegmentNode]:
        """The nodes of the longest known prefix of ``keys`` (local or not); no side effects."""
        path = []
        node = self.root
        for k in keys:
            child = node.children.get(k)
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def match(self, keys: Sequence[SegmentKey], raw_tokens: Optional[bytes] = None, *,
              touch: bool = True) -> list[SegmentNode]:
        """The longest prefix of ``keys`` held locally, as a path of nodes.

        With ``raw_tokens`` (the int64 bytes of the tokens, at least
        ``len(keys) * segment_size`` of them) each node's stored tokens are
        compared too, so a key collision ends the match instead of serving
        another prefix's KV.
        """
        step = self.segment_size * 8
        path: list[SegmentNode] = []
        node = self.root
        for i, k in enumerate(keys):
            child = node.children.get(k)
            if child is None or child.value is None:
                break
            if raw_tokens is not None and child.tokens != raw_tokens[i * step : (i + 1) * step]:
                break
            path.append(child)
            node = child
        if touch and path:
            t = self._touch()
            for n in path:
                n.last_access = t
                n.hits += 1
        return path

    # -- insert --------------------------------------------------------------

    def child(self, parent: SegmentNode, key: SegmentKey) -> SegmentNode:
        """``parent``'s child ``key``, created (no copy, no owner) where missing."""
        return parent.children[key] if key in parent.children else self._new_child(parent, key)

    def _new_child(self, parent: SegmentNode, key: SegmentKey) -> SegmentNode:
        child = SegmentNode(key, parent, parent.depth + 1, next(self._ids))
        parent.children[key] = child
        self.nodes[key] = child
        return child

    def insert(self, keys: Sequence[SegmentKey], raw_tokens: bytes, values: Sequence[Any], *,
               designated: Optional[Sequence[bool]] = None) -> InsertOutcome:
        """Make segments ``0..len(keys)-1`` local, taking ``values[i]`` where needed.

        Args:
            keys: the chained keys of the segments, from segment 0.
            raw_tokens: int64 bytes of the segments' tokens (``len(keys) * segment_size``).
            values: one value (slots) per segment; ``None`` leaves that segment
                as it is (e.g. it lives on another worker for this request).
            designated: per segment, whether an adopted copy is designated
                (default: all designated, as in a pool of one).
        """
        if len(values) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        step = self.segment_size * 8
        if len(raw_tokens) < len(keys) * step:
            raise ValueError("raw_tokens is shorter than the segments")
        out = InsertOutcome()
        t = self._touch()
        node = self.root
        for i, k in enumerate(keys):
            seg_tokens = raw_tokens[i * step : (i + 1) * step]
            child = node.children.get(k)
            if child is None:
                child = self._new_child(node, k)
            elif child.value is not None and child.tokens != seg_tokens:
                # A 64-bit key collision: keep the existing segment, take nothing
                # further along this path (nothing below it can be ours).
                break
            if child.value is None and values[i] is not None:
                child.value = values[i]
                child.tokens = seg_tokens
                child.designated = True if designated is None else bool(designated[i])
                if not child.designated:
                    self._transient.add(child)
                node.nlocal += 1
                self.local_nodes += 1
                if child.lock_ref > 0:
                    self.locked_nodes += 1
                out.adopted.append(True)
                self._update_leaf(child)
                self._update_leaf(node)
            else:
                out.adopted.append(False)
            child.last_access = t
            out.path.append(child)
            node = child
        return out

    # -- locks ---------------------------------------------------------------

    def lock(self, node: SegmentNode) -> int:
        """Lock ``node`` and its ancestors; returns the tokens that became locked."""
        delta = 0
        while node is not self.root:
            if node.lock_ref == 0 and node.value is not None:
                self.locked_nodes += 1
                delta += self.segment_size
            node.lock_ref += 1
            self._update_leaf(node)
            node = node.parent  # type: ignore[assignment]
        return delta

    def unlock(self, node: SegmentNode) -> int:
        """Undo one ``lock(node)``; returns the tokens that became evictable."""
        delta = 0
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"unlock of an unlocked node {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0 and node.value is not None:
                self.locked_nodes -= 1
                delta += self.segment_size
            self._update_leaf(node)
            node = node.parent  # type: ignore[assignment]
        return delta

    # -- eviction ------------------------------------------------------------

    def _update_leaf(self, node: SegmentNode) -> None:
        if node is self.root:
            return
        if node.value is not None and node.lock_ref == 0 and node.nlocal == 0:
            self._leaves.add(node)
            self._ages.add(node)
        else:
            self._leaves.discard(node)
            self._ages.discard(node)

    def set_designated(self, node: SegmentNode, designated: bool) -> None:
        """Make a node's local copy designated or transient (its eviction class)."""
        if node.designated != designated:
            node.designated = designated
            if node.value is not None:
                (self._transient.discard if designated else self._transient.add)(node)
                self._leaves.push(node)

    def evict(self, num_tokens: int, keep: Optional[Callable[[SegmentNode], bool]] = None,
              before_drop: Optional[Callable[[SegmentNode], None]] = None,
              ) -> list[tuple[SegmentNode, Any]]:
        """Drop local segments, leaves first, until at least ``num_tokens`` are freed
        or nothing evictable is left.

        Transient copies of segments another worker holds go first, wherever they
        sit in a chain (a hole is served by that worker); then leaves, transient
        before designated, in ``eviction`` order (``eviction.order_key``). A leaf for which ``keep``
        is true (the pool-wide leaf-first rule: the last copy of a segment whose
        children are cached elsewhere) is passed over while any other leaf can
        go, and dropped only after all of them. ``before_drop(node)`` sees each one
        while it is still in place (value, tokens and path intact).

        Returns ``(node, value)`` for every dropped segment; the caller frees the
        values. A node with other owners stays in the tree as a remote entry.
        """
        out: list[tuple[SegmentNode, Any]] = []

        def drop(node: SegmentNode) -> Optional[SegmentNode]:
            parent = node.parent  # read before _drop_local may prune the node
            if before_drop is not None:
                before_drop(node)
            out.append((node, self._drop_local(node)))
            return parent

        count = -(-num_tokens // self.segment_size)
        if self._transient:  # transient copies only, not the whole tree
            for node in heapq.nsmallest(count, (n for n in self._transient
                                                if n.owners and n.lock_ref == 0),
                                        key=lambda n: (n.last_access, n.id)):
                drop(node)
        if self.eviction == "aware":  # the bonus is in units of the current horizon
            self._leaves.key = order_key("aware", self._tick - (self.oldest_access() or 0),
                                         self.aware)
        self._leaves.evict(count - len(out), drop, keep)
        return out

    def oldest_access(self) -> Optional[int]:
        """``last_access`` of the least recently used evictable leaf (None: none)."""
        node = self._ages.top()
        return None if node is None else node.last_access

    @property
    def clock(self) -> int:
        """The access clock (``last_access`` values are readings of it)."""
        return self._tick

    def used(self, nodes: Iterable[SegmentNode]) -> None:
        """Local copies served to another worker (pulled, leased): used now, as a match uses them."""
        t = self._touch()
        for n in nodes:
            n.last_access, n.hits = t, n.hits + 1

    def drop(self, node: SegmentNode) -> Any:
        """Drop one unlocked local copy (whatever its place in the LRU); returns its value."""
        if node.value is None or node.lock_ref:
            raise RuntimeError(f"cannot drop {node!r}")
        return self._drop_local(node)

    def _drop_local(self, node: SegmentNode) -> Any:
        value = node.value
        assert value is not None and node.lock_ref == 0
        node.value = None
        node.tokens = None
        self.local_nodes -= 1
        self._leaves.discard(node)
        self._ages.discard(node)
        self._transient.discard(node)
        parent = node.parent
        if parent is not None:
            parent.nlocal -= 1
        self._prune(node)
        if parent is not None:
            self._update_leaf(parent)
        return value

    def _prune(self, node: SegmentNode) -> None:
        """Remove ``node`` (and empty ancestors) once nothing refers to it."""
        while (node is not self.root and node.value is None and not node.owners
               and not node.children and node.lock_ref == 0):
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            if self.nodes.get(node.key) is node:
                del self.nodes[node.key]
            node.parent = None
            node = parent

    # -- remote owners and pooled copies ---------------------------------------

    def add_owner_chain(self, keys: Sequence[SegmentKey], held: Sequence[int], owner: str) -> None:
        """``owner`` holds segments ``held`` (indices into ``keys``) of the chain ``keys``."""
        if not held:
            return
        node = self.root
        want = set(held)
        for i, k in enumerate(keys[: max(want) + 1]):
            node = self.child(node, k)
            if i in want:
                node.owners.add(owner)

    def remove_owner_keys(self, keys: Sequence[SegmentKey], owner: str) -> int:
        """Forget that ``owner`` holds the segments ``keys``; returns how many it held."""
        n = 0
        for k in keys:
            node = self.nodes.get(k)
            if node is not None and owner in node.owners:
                n += 1
                node.owners.discard(owner)
                self._prune(node)
        return n

    def drop_owner(self, owner: str) -> int:
        """Forget every segment held by ``owner`` (it left the pool)."""
        held = [n for n in self.nodes.values() if owner in n.owners]
        for n in held:
            n.owners.discard(owner)
        for n in held:
            if n.parent is not None:
                self._prune(n)
        return len(held)

    def adopt(self, keys: Sequence[SegmentKey], value: Any, tokens: bytes, *, designated: bool,
              last_access: Optional[int] = None) -> tuple[SegmentNode, bool]:
        """Make segment ``len(keys) - 1`` local with ``value`` (creating path nodes),
        used now or, with ``last_access``, no later than that reading of ``clock``.

        Returns ``(node, adopted)``; ``adopted`` is False when the segment was
        local already (the caller keeps ``value`` and frees it).
        """
        node = self.root
        for k in keys:  # the path, created where missing
            node = self.child(node, k)
        if node.value is not None:
            return node, False
        assert node.parent is not None
        node.value = value
        node.tokens = tokens
        node.designated = designated
        if not designated:
            self._transient.add(node)
        node.parent.nlocal += 1
        self.local_nodes += 1
        if node.lock_ref > 0:
            self.locked_nodes += 1
        node.last_access = self._touch()
        if last_access is not None:
            node.last_access = min(node.last_access, last_access)
        self._update_leaf(node)
        self._update_leaf(node.parent)
        return node, True

    def run_after(self, keys: Sequence[SegmentKey], start: int) -> list[SegmentNode]:
        """Nodes of ``keys[start:]`` that exist and are held somewhere (here or by an
        owner), up to the first that is not: the part of a prefix the pool can serve."""
        node = self.root if start == 0 else self.nodes.get(keys[start - 1])
        out: list[SegmentNode] = []
        if node is None:
            return out
        for k in keys[start:]:
            child = node.children.get(k)
            if child is None or (child.value is None and not child.owners):
                break
            out.append(child)
            node = child
        return out

    # -- inspection ----------------------------------------------------------

    def iter_nodes(self) -> Iterator[SegmentNode]:
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def path_to(self, node: SegmentNode) -> list[SegmentNode]:
        out = []
        while node is not self.root:
            out.append(node)
            node = node.parent  # type: ignore[assignment]
        out.reverse()
        return out

    def check(self) -> None:
        """Recount everything from the nodes and compare with the counters."""
        local = locked = 0
        leaves, transient = set(), set()
        seen = 0
        for n in self.iter_nodes():
            seen += 1
            assert self.nodes.get(n.key) is n, n
            assert n.parent is not None and n.parent.children.get(n.key) is n, n
            assert n.lock_ref >= 0, n
            if n.value is not None:
                local += 1
                locked += n.lock_ref > 0
                assert n.tokens is not None and len(n.tokens) == self.segment_size * 8, n
                if n.lock_ref == 0 and n.nlocal == 0:
                    leaves.add(n)
                if not n.designated:
                    transient.add(n)
            assert n.nlocal == sum(c.value is not None for c in n.children.values()), n
            for c in n.children.values():
                assert c.lock_ref <= n.lock_ref, (c, n)  # a lock covers the whole path
        assert local == self.local_nodes, (local, self.local_nodes)
        assert locked == self.locked_nodes, (locked, self.locked_nodes)
        assert leaves == set(self._leaves) == set(self._ages), (len(leaves), len(self._leaves))
        assert transient == self._transient, (len(transient), len(self._transient))
        assert seen == len(self.nodes), (seen, len(self.nodes))
