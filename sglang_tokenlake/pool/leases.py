"""Leases: segments an owner keeps for a requester that ships queries to them.

Owner side, ``LeaseTable``::

    lease     broker thread, slot mutex held: every key is held here and its tokens
              match the digest the requester sent -> granted at once. No wait on this
              worker's scheduler, so two workers leasing from each other never stall.
    pin       scheduler thread, before anything frees a slot (each poll, each
              eviction): the granted leases' nodes are locked in the tree. A node
              that went in between breaks its lease; the requester's next query is
              refused and its request starts over.
    attend    broker thread: a query may touch only its lease's keys; use renews it
    unlease   broker thread marks it released (no job queued); the scheduler thread
              unlocks and forgets it at its next settle
    expiry    a lease unused for ``ttl`` seconds is dropped (its requester died, or
              every unlease it sent was lost)
    flush     every lease ends without unlocking: the tree it pinned is gone

Requester side, ``Releases``: an unlease that fails is sent again with backoff
until the owner acknowledges it, leaves the pool, or the attempts run out (the
owner's expiry is the last resort).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Optional

from sglang_tokenlake.counters import Counters
from sglang_tokenlake.tree import SegmentNode, SegmentTree

DIGEST_BYTES = 16
MAX_LEASES_PER_PEER = 4096

GRANTED, PINNED, BROKEN, RELEASED = "granted", "pinned", "broken", "released"


def token_digest(tokens: bytes) -> bytes:
    """What a lease carries per segment so the owner can check it holds the same tokens."""
    return hashlib.blake2b(tokens, digest_size=DIGEST_BYTES).digest()


class Lease:
    __slots__ = ("peer", "keys", "digests", "key_set", "nodes", "expires", "state")

    def __init__(self, peer: str, keys: list[int], digests: list[bytes], expires: float) -> None:
        self.peer = peer
        self.keys = keys
        self.digests = digests
        self.key_set = frozenset(keys)
        self.nodes: list[SegmentNode] = []
        self.expires = expires
        self.state = GRANTED


class LeaseTable:
    """The leases this worker granted to its peers.

    Args:
        tree: the worker's segment tree.
        ttl: seconds a lease lives without use.
        counters: the pool's counters.
        clock: seconds (monotonic); tests pass their own.
    """

    def __init__(self, tree: SegmentTree, ttl: float, counters: Counters,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tree = tree
        self.ttl = ttl
        self.counters = counters
        self.clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._pending: list[str] = []
        self._released: list[str] = []

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    # -- broker thread ---------------------------------------------------------------

    def grant(self, peer: str, lease_id: str, keys: Sequence[int],
              digests: Sequence[bytes]) -> Optional[str]:
        """Grant ``lease_id`` to ``peer`` (the caller holds the slot mutex).

        Returns None when granted, else why not (nothing is recorded then).
        """
        if len(keys) != len(digests) or not keys:
            return "a lease needs one digest per key"
        if len(set(keys)) != len(keys):
            return "a lease lists a key twice"
        for k, d in zip(keys, digests):
            node = self.tree.nodes.get(k)
            if node is None or node.value is None:
                return f"segment {k:#x} is not held here"
            if node.tokens is None or token_digest(node.tokens) != d:
                self.counters.add("lease_token_mismatch")
                return f"segment {k:#x} holds other tokens"
        with self._lock:
            if lease_id in self._leases:
                return "lease id already in use"
            if sum(1 for x in self._leases.values() if x.peer == peer) >= MAX_LEASES_PER_PEER:
                return f"{peer} holds {MAX_LEASES_PER_PEER} leases already"
            self._leases[lease_id] = Lease(peer, list(keys), list(digests),
                                           self.clock() + self.ttl)
            self._pending.append(lease_id)
        return None

    def use(self, lease_id: str, peer: str, keys: Sequence[int]) -> Optional[str]:
        """An ``attend`` of ``peer`` under ``lease_id`` touches ``keys``: allowed? (renews it)"""
        lease = self._leases.get(lease_id)
        if lease is None or lease.peer != peer or lease.state == RELEASED:
            return "no such lease"
        if lease.state == BROKEN:
            return "the lease lost a segment before it was pinned"
        if not lease.key_set.issuperset(keys):
            return "a key outside the lease"
        lease.expires = self.clock() + self.ttl
        return None

    def release(self, lease_id: str, peer: str) -> None:
        """``peer`` is done with ``lease_id``: ended at the next ``settle`` (idempotent)."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is not None and lease.peer == peer and lease.state != RELEASED:
                lease.state = RELEASED
                self._released.append(lease_id)

    # -- scheduler thread ------------------------------------------------------------

    def settle(self, need_tokens: int = 0) -> None:
        """End the leases released since the last call, pin the ones granted since
        (see ``pin``)."""
        if self._released:
            with self._lock:
                released, self._released = self._released, []
            for lease_id in released:
                self.drop(lease_id)
        self.pin(need_tokens)

    def pin(self, need_tokens: int = 0) -> None:
        """Lock the nodes of leases granted since the last call.

        A lease whose pin would leave fewer than ``need_tokens`` evictable, where
        there were enough before, is broken instead: the scheduler admitted work
        counting on that room (an eviction is about to free ``need_tokens``), and a
        peer's lease must never make this worker run out of memory. Its requester's
        next query is refused and its request starts over.
        """
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for lease_id in pending:
            lease = self._leases.get(lease_id)
            if lease is None or lease.state != GRANTED:
                continue
            nodes = []
            for k, d in zip(lease.keys, lease.digests):
                node = self.tree.nodes.get(k)
                if node is None or node.value is None or node.tokens is None \
                        or token_digest(node.tokens) != d:
                    break
                nodes.append(node)
            if len(nodes) != len(lease.keys):
                lease.state = BROKEN
                self.counters.add("leases_broken")
                continue
            room = self.tree.evictable_tokens
            for n in nodes:
                self.tree.lock(n)
            if room >= need_tokens > self.tree.evictable_tokens:
                for n in nodes:
                    self.tree.unlock(n)
                lease.state = BROKEN
                self.counters.add("leases_broken_for_room")
                continue
            lease.nodes = nodes
            lease.state = PINNED
            self.tree.used(nodes)  # served to the requester: as recent as a local hit

    def drop(self, lease_id: str, peer: Optional[str] = None) -> bool:
        """End ``lease_id`` (only ``peer``'s, when given)."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or (peer is not None and lease.peer != peer):
                return False
            del self._leases[lease_id]
        if lease.nodes:  # pinned (a released lease may have been)
            for n in lease.nodes:
                self.tree.unlock(n)
        lease.nodes = []
        return True

    def drop_peer(self, peer: str) -> int:
        ids = [i for i, x in list(self._leases.items()) if x.peer == peer]
        for i in ids:
            self.drop(i)
        return len(ids)

    def expire(self) -> int:
        now = self.clock()
        ids = [i for i, x in list(self._leases.items()) if x.expires < now]
        for i in ids:
            self.drop(i)
        self.counters.add("leases_expired", len(ids))
        return len(ids)

    def end_all(self) -> int:
        """The tree was replaced (flush): forget every lease without unlocking."""
        with self._lock:
            n = len(self._leases)
            self._leases.clear()
            self._pending.clear()
        self.counters.add("leases_ended_by_flush", n)
        return n

    def by_peer(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for x in list(self._leases.values()):
            out[x.peer] += 1
        return dict(out)


class Releases:
    """Unleases sent until acknowledged (requester side; scheduler thread).

    Args:
        send: sends one unlease ``(owner, lease id)`` and returns its future.
        alive: is the owner still a member?
        submit: runs a callable on the scheduler thread.
        counters: the pool's counters.
        attempts: sends per lease before giving up (the owner's expiry frees it).
        backoff: seconds before the first retry; doubles each time.
    """

    def __init__(self, send: Callable[[str, str], object], alive: Callable[[str], bool],
                 submit: Callable[[Callable[[], None]], None],
                 counters: Counters, attempts: int = 6, backoff: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.send = send
        self.alive = alive
        self.submit = submit
        self.counters = counters
        self.attempts = attempts
        self.backoff = backoff
        self.clock = clock
        self.waiting: list[tuple[float, str, str, int]] = []  # (due, owner, lease, sent so far)

    def release(self, owner: str, lease_id: str, sent: int = 0) -> None:
        fut = self.send(owner, lease_id)
        self.counters.add("unleases_sent")

        def done(f: object) -> None:
            if f.exception() is None:  # type: ignore[attr-defined]
                return
            self.submit(lambda: self._again(owner, lease_id, sent + 1))

        fut.add_done_callback(done)  # type: ignore[attr-defined]

    def _again(self, owner: str, lease_id: str, sent: int) -> None:
        if sent >= self.attempts:
            self.counters.add("unleases_given_up")
            return
        due = self.clock() + self.backoff * (2 ** (sent - 1))
        self.waiting.append((due, owner, lease_id, sent))

    def poll(self) -> None:
        if not self.waiting:
            return
        now = self.clock()
        due = [w for w in self.waiting if w[0] <= now]
        if not due:
            return
        self.waiting = [w for w in self.waiting if w[0] > now]
        for _, owner, lease_id, sent in due:
            if self.alive(owner):
                self.counters.add("unleases_retried")
                self.release(owner, lease_id, sent)
