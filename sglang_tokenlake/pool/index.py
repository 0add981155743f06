"""Index synchronisation: every worker knows which segments exist in the pool, and where.

Designated copies are announced by key chain (``announce``) and retracted
(``evicted``) with a per-sender sequence number; heartbeats carry the sender's
latest. A receiver that sees a gap (an event it refused or missed), or a member
that joins or restarts, pulls the sender's whole index with ``sync``: the
answer replaces what it knew of that sender. Applied on the scheduler thread.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from sglang_tokenlake.pool.surfaces import CacheHost
from sglang_tokenlake.transport.broker import Request
from sglang_tokenlake.transport.peers import PeerAgent
from sglang_tokenlake.tree import SegmentNode

MAX_CHAIN = 1 << 16  # segments in one announced chain or put


class IndexSync:
    """Announcements, evictions and full syncs of this worker's part of the pool index.

    Args:
        host: the worker's cache (its tree; ``submit`` to the scheduler thread).
        agent: requests to peers.
        self_id: this worker's member id.
        members: the live member set (callable; ids -> capacity).
        known_sender: the sender of a request if it is a live member, else None
            (the request is answered with an error).
        counters: the pool's counters.
        timeout: seconds an index request may take.
    """

    def __init__(self, host: CacheHost, agent: PeerAgent, self_id: str,
                 members: Callable[[], dict[str, int]],
                 known_sender: Callable[[Request], str | None],
                 counters: defaultdict[str, int], timeout: float) -> None:
        self.host = host
        self.tree = host.tree
        self.agent = agent
        self.self_id = self_id
        self.members = members
        self.known_sender = known_sender
        self.counters = counters
        self.timeout = timeout
        self.seq = 0  # index events broadcast so far
        self._announce: list[tuple[list[int], list[int]]] = []
        self._evicted: list[int] = []
        self._applied: dict[str, int] = {}  # peer -> last index event applied
        self._syncing: set[str] = set()

    # -- this worker's changes (scheduler thread) ----------------------------------------

    def announce(self, chain: list[int], held: list[int]) -> None:
        """This worker now holds segments ``held`` (indices) of ``chain`` as a home."""
        self._announce.append((chain, held))

    def announce_node(self, node: SegmentNode) -> None:
        self._announce.append(([x.key for x in self.tree.path_to(node)], [node.depth]))

    def retract(self, keys: list[int]) -> None:
        """This worker no longer holds ``keys`` as a home."""
        self._evicted.extend(keys)

    def flush(self) -> None:
        """Broadcast what changed since the last call."""
        if self._announce:
            chains, self._announce = self._announce, []
            self._broadcast("announce", {"chains": [[k, h] for k, h in chains]})
        if self._evicted:
            keys, self._evicted = self._evicted, []
            self._broadcast("evicted", {"keys": keys})

    def pending(self) -> tuple[int, int]:
        """(chains, keys) waiting to be broadcast (tests)."""
        return len(self._announce), len(self._evicted)

    def index_chains(self) -> list[list[list[int]]]:
        """Every designated local segment as ``[chain keys, [its index]]``."""
        chains = []
        for node in self.tree.nodes.values():
            if node.value is not None and node.designated:
                chains.append([[x.key for x in self.tree.path_to(node)], [node.depth]])
        return chains

    def _broadcast(self, kind: str, header: dict[str, Any]) -> None:
        self.seq += 1
        header = {"from": self.self_id, "seq": self.seq, **header}
        for peer in self.members():
            if peer != self.self_id:
                self.agent.request(peer, kind, header, timeout=self.timeout)
        self.counters[f"{kind}_sent"] += 1

    # -- what peers hold (scheduler thread) ------------------------------------------------

    def forget_peer(self, peer: str) -> None:
        """``peer`` joined or restarted: what we applied of it no longer counts."""
        self._applied.pop(peer, None)

    def request_sync(self, peer: str) -> None:
        if peer in self._syncing:
            return
        self._syncing.add(peer)
        fut = self.agent.request(peer, "sync", {"from": self.self_id}, timeout=self.timeout * 2)
        self.counters["sync_requests"] += 1

        def done(f: Future) -> None:
            if f.exception() is not None:
                self.host.submit(lambda: self._syncing.discard(peer))
                return
            h = f.result().header
            self.host.submit(lambda: self.apply_sync(peer, h))

        fut.add_done_callback(done)

    def apply_sync(self, peer: str, h: dict[str, Any]) -> None:
        self._syncing.discard(peer)
        chains, seq = h.get("chains"), h.get("seq")
        if not valid_chains(chains) or not isinstance(seq, int):
            self.counters["malformed"] += 1
            return
        self.tree.drop_owner(peer)
        for keys, held in chains:
            self.tree.add_owner_chain(keys, held, peer)
        self._applied[peer] = seq

    def apply_event(self, peer: str, seq: Any, apply: Callable[[], Any]) -> None:
        apply()
        last = self._applied.get(peer)
        if not isinstance(seq, int) or last is None or seq != last + 1:
            self.request_sync(peer)  # a gap: what we know of this peer may be stale
        if isinstance(seq, int) and (last is None or seq > last):
            self._applied[peer] = seq

    def check_seq(self, peer: str, seq: Any) -> None:
        """A heartbeat says ``peer`` sent ``seq`` events: sync if we applied fewer."""
        if isinstance(seq, int) and seq > self._applied.get(peer, -1):
            self.request_sync(peer)

    # -- broker thread: handlers -------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[[Request], None]]:
        return {"announce": self.on_announce, "evicted": self.on_evicted, "sync": self.on_sync}

    def on_announce(self, req: Request) -> None:
        peer = self.known_sender(req)
        if peer is None:
            return
        chains = req.msg.header.get("chains")
        if not valid_chains(chains):
            self.counters["malformed"] += 1
            req.error("announce: chains must be [[keys], [indices]] lists")
            return
        seq = req.msg.header.get("seq")
        self.host.submit(lambda: self.apply_event(
            peer, seq, lambda: [self.tree.add_owner_chain(k, h, peer) for k, h in chains]))
        req.reply("ok")

    def on_evicted(self, req: Request) -> None:
        peer = self.known_sender(req)
        if peer is None:
            return
        keys = req.msg.header.get("keys")
        if not int_list(keys):
            self.counters["malformed"] += 1
            req.error("evicted: keys must be a list of integers")
            return
        seq = req.msg.header.get("seq")
        self.host.submit(lambda: self.apply_event(
            peer, seq, lambda: self.tree.remove_owner_keys(keys, peer)))
        req.reply("ok")

    def on_sync(self, req: Request) -> None:
        # Index metadata only (keys, no KV): answered to any authenticated caller.
        self.host.submit(lambda: req.reply("index", {"seq": self.seq, "chains": self.index_chains()}))


def int_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def valid_chains(chains: Any) -> bool:
    if not isinstance(chains, list) or len(chains) > MAX_CHAIN:
        return False
    for c in chains:
        if not (isinstance(c, list) and len(c) == 2 and int_list(c[0]) and int_list(c[1])):
            return False
        if len(c[0]) > MAX_CHAIN or any(not 0 <= i < len(c[0]) for i in c[1]):
            return False
    return True
