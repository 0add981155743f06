"""Full index sync in bounded pages.

A sync sends an owner's index as *records*, one per node: its key, its
parent's key (-1 at the top) and whether the owner holds it (as a designated
copy): each node once, parents before children. The owner takes a snapshot
of its index when the first page is asked for and serves every page from it,
so pages are consistent with each other and with the snapshot's event
sequence number ``seq``::

    requester                                owner
    sync {from, sync: None, cursor: 0}  ──▶  snapshot (scheduler thread), page 0
                                        ◀──  index {sync, seq, cursor, total, keys, parents, held, done}
    sync {from, sync: id, cursor: n}    ──▶  page from the snapshot (broker thread)
    ...                                 ◀──  ... done: true

The requester checks every page and keeps them aside; only after the last
page does it replace what it knew of the owner, then re-apply the owner's
index events that arrived meanwhile with a ``seq`` after the snapshot's. A
lost page, an error or a malformed page abandons the sync and leaves the old
view in place; it is retried at the owner's next heartbeat.
"""

from __future__ import annotations

import threading
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from sglang_tokenlake.pool.limits import (
    MAX_MEMBER_ID,
    MAX_REMOTE_ENTRIES,
    MAX_SYNC_BACKLOG,
    MAX_SYNC_SNAPSHOTS,
    SYNC_SNAPSHOT_TTL,
)
from sglang_tokenlake.tree import SegmentNode, SegmentTree

_U64 = 1 << 64


@dataclass
class Snapshot:
    """An owner's index at event ``seq``: records in parent-before-child order."""

    peer: str
    seq: int
    keys: array  # 'Q'
    parents: array  # 'q': index of the parent record, -1 at the top
    held: bytearray
    used: float = 0.0

    def page(self, sid: str, cursor: int, size: int) -> dict[str, Any]:
        end = min(len(self.keys), cursor + size)
        keys = self.keys[cursor:end].tolist()
        parents = [self.keys[p] if p >= 0 else -1 for p in self.parents[cursor:end]]
        return {"sync": sid, "seq": self.seq, "cursor": cursor, "total": len(self.keys),
                "keys": keys, "parents": parents, "held": bytes(self.held[cursor:end]),
                "done": end >= len(self.keys)}


def snapshot(tree: SegmentTree, peer: str, seq: int) -> Snapshot:
    """Records of the designated local nodes and their ancestors (scheduler thread)."""
    need: set[SegmentNode] = set()
    for n in tree.nodes.values():
        if n.value is not None and n.designated:
            x: Optional[SegmentNode] = n
            while x is not None and x.parent is not None and x not in need:
                need.add(x)
                x = x.parent
    keys, parents, held = array("Q"), array("q"), bytearray()
    stack = [(c, -1) for c in reversed(list(tree.root.children.values())) if c in need]
    while stack:
        n, p = stack.pop()
        i = len(keys)
        keys.append(n.key)
        parents.append(p)
        held.append(1 if n.value is not None and n.designated else 0)
        stack.extend((c, i) for c in reversed(list(n.children.values())) if c in need)
    return Snapshot(peer, seq, keys, parents, held)


class SnapshotStore:
    """Snapshots being paged through: one per requester, ``MAX_SYNC_SNAPSHOTS`` at most,
    dropped after ``SYNC_SNAPSHOT_TTL`` seconds unused (any thread)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._snaps: dict[str, Snapshot] = {}
        self._lock = threading.Lock()
        self.clock = clock

    def __len__(self) -> int:
        return len(self._snaps)

    def add(self, snap: Snapshot) -> str:
        sid = uuid.uuid4().hex[:16]
        now = self.clock()
        snap.used = now
        with self._lock:
            for k, s in list(self._snaps.items()):
                if s.peer == snap.peer or now - s.used > SYNC_SNAPSHOT_TTL:
                    del self._snaps[k]
            while len(self._snaps) >= MAX_SYNC_SNAPSHOTS:
                del self._snaps[min(self._snaps, key=lambda k: self._snaps[k].used)]
            self._snaps[sid] = snap
        return sid

    def page(self, sid: str, peer: str, cursor: int, size: int) -> dict[str, Any] | str:
        """The page at ``cursor``, or why there is none."""
        with self._lock:
            snap = self._snaps.get(sid)
            if snap is None or snap.peer != peer:
                return "sync: no such sync in progress (expired or replaced): start over"
            if not 0 <= cursor < len(snap.keys):
                return f"sync: cursor {cursor} outside 0..{len(snap.keys) - 1}"
            snap.used = self.clock()
            page = snap.page(sid, cursor, size)
            if page["done"]:
                del self._snaps[sid]
        return page

    def clear(self) -> None:
        with self._lock:
            self._snaps.clear()


@dataclass
class Pull:
    """The requester's side of one sync: pages checked and kept until the last."""

    sid: Optional[str] = None
    seq: int = -1
    total: int = -1
    keys: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    held: bytearray = field(default_factory=bytearray)
    seen: set[int] = field(default_factory=set)
    events: list[tuple[int, Callable[[], Any]]] = field(default_factory=list)
    overflow: bool = False

    def add(self, h: dict[str, Any]) -> Optional[str]:
        """Check and keep one page; why it is refused, or None."""
        sid, seq, cursor, total = h.get("sync"), h.get("seq"), h.get("cursor"), h.get("total")
        keys, parents, held, done = h.get("keys"), h.get("parents"), h.get("held"), h.get("done")
        if not (isinstance(sid, str) and _int(seq) and _int(cursor) and _int(total)
                and isinstance(keys, list) and isinstance(parents, list)
                and isinstance(held, bytes) and isinstance(done, bool)):
            return "a sync page needs sync, seq, cursor, total, keys, parents, held and done"
        if self.sid is None:
            if not 0 <= total <= MAX_REMOTE_ENTRIES:
                return f"an index of {total} segments exceeds {MAX_REMOTE_ENTRIES}"
            self.sid, self.seq, self.total = sid, seq, total
        if (sid, seq, total) != (self.sid, self.seq, self.total) or cursor != len(self.keys):
            return "a sync page out of order"
        n = len(keys)
        if not (len(parents) == len(held) == n and (n > 0 or total == 0)
                and cursor + n <= total and done == (cursor + n == total)):
            return "a sync page's fields disagree"
        for k, p, f in zip(keys, parents, held):
            if not (_int(k) and 0 <= k < _U64 and _int(p) and f in (0, 1)):
                return "sync records need integer keys and parents and 0/1 held flags"
            if k in self.seen:
                return f"segment {k:#x} listed twice"
            if p != -1 and p not in self.seen:
                return f"segment {k:#x} comes before its parent"
            self.seen.add(k)
        self.keys += keys
        self.parents += parents
        self.held += held
        return None

    def event(self, seq: Any, apply: Callable[[], Any]) -> None:
        """An index event of the owner arrived while this sync is in flight."""
        if isinstance(seq, int) and len(self.events) < MAX_SYNC_BACKLOG:
            self.events.append((seq, apply))
        else:
            self.overflow = True

    def bare_leaf(self) -> bool:
        """A record held by nobody with nothing under it (it would stay in the tree)."""
        parents = set(self.parents)
        return any(not f and k not in parents for k, f in zip(self.keys, self.held))

    def apply(self, tree: SegmentTree, owner: str) -> int:
        """Add the records' nodes, ``owner`` holding the held ones; returns how many it holds."""
        held = 0
        skipped: set[int] = set()  # records that disagree with the tree, and their subtrees
        for k, p, f in zip(self.keys, self.parents, self.held):
            parent = tree.root if p == -1 else (None if p in skipped else tree.nodes.get(p))
            known = tree.nodes.get(k)
            if parent is None or (known is not None and known.parent is not parent):
                skipped.add(k)  # a key known elsewhere in the tree (see index.chain_conflicts)
                continue
            node = tree.child(parent, k)
            if f:
                node.owners.add(owner)
                held += 1
        return held


def valid_request(h: dict[str, Any]) -> Optional[str]:
    """Why a ``sync`` request is malformed, or None."""
    peer, sid, cursor = h.get("from"), h.get("sync"), h.get("cursor", 0)
    if not (isinstance(peer, str) and 0 < len(peer) <= MAX_MEMBER_ID):
        return "sync: needs the requester's member id"
    if not (sid is None or (isinstance(sid, str) and 0 < len(sid) <= 64)):
        return "sync: the sync id must be a short string"
    if not _int(cursor) or cursor < 0 or (sid is None and cursor != 0):
        return "sync: the cursor must be a non-negative integer (0 to start)"
    return None


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

