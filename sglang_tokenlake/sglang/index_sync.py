"""Index synchronisation: every worker knows which segments exist in the pool, and where.

Designated copies are announced by key chain (``announce``) and retracted
(``evicted``) with a per-sender sequence number; heartbeats carry the sender's
latest. A receiver that sees a gap (an event it refused or missed), or a member
that joins or restarts, pulls the sender's whole index with ``sync``: the
answer replaces what it knew of that sender. Applied on the scheduler thread.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from sglang_tokenlake.transport.broker import Request

MAX_CHAIN = 1 << 16  # segments in one announced chain or put


class IndexSync:
    """Mixin of PoolLink: announcements, evictions and full syncs of the segment index."""

    def index_chains(self) -> list[list[list[int]]]:
        """Every designated local segment as ``[chain keys, [its index]]``."""
        chains = []
        for node in self.tree.nodes.values():
            if node.value is not None and node.designated:
                chains.append([[x.key for x in self.tree.path_to(node)], [node.depth]])
        return chains

    def request_sync(self, peer: str) -> None:
        if peer in self._syncing:
            return
        self._syncing.add(peer)
        fut = self.agent.request(peer, "sync", {"from": self.self_id},
                                 timeout=self.config.peer_timeout * 2)
        self.counters["sync_requests"] += 1

        def done(f: Future) -> None:
            if f.exception() is not None:
                self.cache.submit(lambda: self._syncing.discard(peer))
                return
            h = f.result().header
            self.cache.submit(lambda: self._apply_sync(peer, h))

        fut.add_done_callback(done)

    def _apply_sync(self, peer: str, h: dict[str, Any]) -> None:
        self._syncing.discard(peer)
        chains, seq = h.get("chains"), h.get("seq")
        if not _valid_chains(chains) or not isinstance(seq, int):
            self.counters["malformed"] += 1
            return
        self.tree.drop_owner(peer)
        for keys, held in chains:
            self.tree.add_owner_chain(keys, held, peer)
        self._applied[peer] = seq

    def _apply_event(self, peer: str, seq: Any, apply: Any) -> None:
        apply()
        last = self._applied.get(peer)
        if not isinstance(seq, int) or last is None or seq != last + 1:
            self.request_sync(peer)  # a gap: what we know of this peer may be stale
        if isinstance(seq, int) and (last is None or seq > last):
            self._applied[peer] = seq

    def _check_seq(self, peer: str, seq: Any) -> None:
        if isinstance(seq, int) and seq > self._applied.get(peer, -1):
            self.request_sync(peer)

    def _broadcast(self, kind: str, header: dict[str, Any]) -> None:
        self._seq += 1
        header = {"from": self.self_id, "seq": self._seq, **header}
        for peer in self.alive():
            if peer != self.self_id:
                self.agent.request(peer, kind, header, timeout=self.config.peer_timeout)
        self.counters[f"{kind}_sent"] += 1

    def _on_announce(self, req: Request) -> None:
        peer = self._known_sender(req)
        if peer is None:
            return
        chains = req.msg.header.get("chains")
        if not _valid_chains(chains):
            self.counters["malformed"] += 1
            req.error("announce: chains must be [[keys], [indices]] lists")
            return
        seq = req.msg.header.get("seq")
        self.cache.submit(lambda: self._apply_event(
            peer, seq, lambda: [self.tree.add_owner_chain(k, h, peer) for k, h in chains]))
        req.reply("ok")

    def _on_evicted(self, req: Request) -> None:
        peer = self._known_sender(req)
        if peer is None:
            return
        keys = req.msg.header.get("keys")
        if not _int_list(keys):
            self.counters["malformed"] += 1
            req.error("evicted: keys must be a list of integers")
            return
        seq = req.msg.header.get("seq")
        self.cache.submit(lambda: self._apply_event(
            peer, seq, lambda: self.tree.remove_owner_keys(keys, peer)))
        req.reply("ok")

    def _on_sync(self, req: Request) -> None:
        # Index metadata only (keys, no KV): answered to any authenticated caller.
        self.cache.submit(lambda: req.reply("index", {"seq": self._seq, "chains": self.index_chains()}))


def _int_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _valid_chains(chains: Any) -> bool:
    if not isinstance(chains, list) or len(chains) > MAX_CHAIN:
        return False
    for c in chains:
        if not (isinstance(c, list) and len(c) == 2 and _int_list(c[0]) and _int_list(c[1])):
            return False
        if len(c[0]) > MAX_CHAIN or any(not 0 <= i < len(c[0]) for i in c[1]):
            return False
    return True
