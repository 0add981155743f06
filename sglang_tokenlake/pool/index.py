"""Index synchronisation: every worker knows which segments exist in the pool, and where.

Designated copies are announced by key chain (``announce``) and retracted
(``evicted``) with a per-sender sequence number; heartbeats carry the sender's
latest. A receiver that sees a gap (an event it refused or missed), or a member
that joins or restarts, pulls the sender's whole index with ``sync``, in
bounded pages (sync.py): once the last page arrived it replaces what the
receiver knew of that sender. Applied on the scheduler thread. What one peer
may make this worker index is bounded (limits.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Optional

from sglang_tokenlake.counters import Counters
from sglang_tokenlake.pool.limits import (
    MAX_MESSAGE_KEYS,
    MAX_PENDING_JOBS,
    MAX_REMOTE_ENTRIES,
    SYNC_PAGE_RECORDS,
    JobGate,
    check_keys,
    int_list,
)
from sglang_tokenlake.pool.surfaces import CacheHost
from sglang_tokenlake.pool.sync import Pull, SnapshotStore, snapshot, valid_request
from sglang_tokenlake.transport.broker import Request
from sglang_tokenlake.transport.peers import PeerAgent
from sglang_tokenlake.tree import SegmentNode

MAX_CHAIN = MAX_MESSAGE_KEYS  # segments in one announced chain or put


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
        jobs: the bounded queue of scheduler jobs broker handlers submit (by
            default a new one; the pool's other handlers share ``self.jobs``).
    """

    def __init__(self, host: CacheHost, agent: PeerAgent, self_id: str,
                 members: Callable[[], dict[str, int]],
                 known_sender: Callable[[Request], str | None],
                 counters: Counters, timeout: float,
                 jobs: Optional[JobGate] = None) -> None:
        self.host = host
        self.tree = host.tree
        self.agent = agent
        self.self_id = self_id
        self.members = members
        self.known_sender = known_sender
        self.counters = counters
        self.timeout = timeout
        self.jobs = jobs if jobs is not None else JobGate(host.submit, MAX_PENDING_JOBS, counters)
        self.seq = 0  # index events broadcast so far
        self.page_records = SYNC_PAGE_RECORDS
        self._announce: list[tuple[list[int], list[int]]] = []
        self._evicted: list[int] = []
        self._applied: dict[str, int] = {}  # peer -> last index event applied
        self._entries: dict[str, int] = {}  # peer -> segments indexed as its copies
        self._syncs: dict[str, Pull] = {}  # peer -> sync in flight
        self.snapshots = SnapshotStore()  # served to peers paging through our index
        # Called (scheduler thread) with local copies whose other holders changed: a peer
        # announced one this worker holds designated, or retracted one it holds transient.
        self.reconsider: Callable[[list[SegmentNode]], None] = lambda nodes: None

    # -- this worker's changes (scheduler thread) ----------------------------------------

    def announce(self, chain: list[int], held: list[int]) -> None:
        """This worker now holds segments ``held`` (indices) of ``chain`` as a home."""
        self._announce.append((chain, held))
        if self._evicted:  # a retraction still queued would be sent after this: drop it
            again = {chain[i] for i in held}
            self._evicted = [k for k in self._evicted if k not in again]

    def announce_node(self, node: SegmentNode) -> None:
        self.announce([x.key for x in self.tree.path_to(node)], [node.depth])

    def retract(self, keys: list[int]) -> None:
        """This worker no longer holds ``keys`` as a home."""
        self._evicted.extend(keys)

    def flush(self) -> None:
        """Broadcast what changed since the last call, in messages of at most
        ``MAX_MESSAGE_KEYS`` keys."""
        if self._announce:
            chains, self._announce = self._announce, []
            batch: list[list[Any]] = []
            size = 0
            for keys, held in chains:
                if len(keys) > MAX_MESSAGE_KEYS:
                    self.counters.add("announce_too_long")
                    continue
                if size + len(keys) > MAX_MESSAGE_KEYS:
                    self._broadcast("announce", {"chains": batch})
                    batch, size = [], 0
                batch.append([keys, held])
                size += len(keys)
            if batch:
                self._broadcast("announce", {"chains": batch})
        if self._evicted:
            keys, self._evicted = list(dict.fromkeys(self._evicted)), []
            for i in range(0, len(keys), MAX_MESSAGE_KEYS):
                self._broadcast("evicted", {"keys": keys[i : i + MAX_MESSAGE_KEYS]})

    def reset(self) -> None:
        """The cache was flushed: announcements not yet sent name segments that are gone
        (their retractions, queued before the flush, still go out)."""
        self._announce.clear()
        self.snapshots.clear()

    def pending(self) -> tuple[int, int]:
        """(chains, keys) waiting to be broadcast (tests)."""
        return len(self._announce), len(self._evicted)

    def _broadcast(self, kind: str, header: dict[str, Any]) -> None:
        self.seq += 1
        header = {"from": self.self_id, "seq": self.seq, **header}
        for peer in self.members():
            if peer != self.self_id:
                self.agent.request(peer, kind, header, timeout=self.timeout)
        self.counters.add(f"{kind}_sent")

    # -- what peers hold (scheduler thread) ------------------------------------------------

    def forget_peer(self, peer: str) -> None:
        """``peer`` joined or restarted: what we applied of it no longer counts (a sync
        in flight is abandoned: it may page through the old incarnation's index)."""
        self._applied.pop(peer, None)
        self._syncs.pop(peer, None)

    def drop_peer(self, peer: str) -> int:
        """Forget every segment ``peer`` holds (it left or restarted)."""
        self._entries.pop(peer, None)
        return self.tree.drop_owner(peer)

    def entries(self, peer: str) -> int:
        return self._entries.get(peer, 0)

    def request_sync(self, peer: str) -> None:
        if peer in self._syncs:
            return
        pull = self._syncs[peer] = Pull()
        self.counters.add("sync_requests")
        self._ask(peer, pull)

    def _ask(self, peer: str, pull: Pull) -> None:
        header = {"from": self.self_id, "sync": pull.sid, "cursor": len(pull.keys)}
        fut = self.agent.request(peer, "sync", header, timeout=self.timeout * 2)

        def done(f: Future) -> None:
            if f.exception() is not None:
                self.host.submit(lambda: self._sync_failed(peer, pull, str(f.exception())))
                return
            h = f.result().header
            self.host.submit(lambda: self._sync_page(peer, pull, h))

        fut.add_done_callback(done)

    def _sync_page(self, peer: str, pull: Pull, h: dict[str, Any]) -> None:
        if self._syncs.get(peer) is not pull:
            return  # abandoned meanwhile
        why = pull.add(h)
        if why is None and h.get("done") and pull.bare_leaf():
            why = "a record held by nobody has nothing under it"
        if why is not None:
            self.counters.add("malformed")
            self._sync_failed(peer, pull, why)
        elif h["done"]:
            self._sync_done(peer, pull)
        else:
            self.counters.add("sync_pages")
            self._ask(peer, pull)

    def _sync_failed(self, peer: str, pull: Pull, why: str) -> None:
        """The old view stays; the peer's next heartbeat (``check_seq``) retries."""
        if self._syncs.get(peer) is not pull:
            return
        del self._syncs[peer]
        self._applied.pop(peer, None)
        self.counters.add("sync_failures")

    def _sync_done(self, peer: str, pull: Pull) -> None:
        del self._syncs[peer]
        self.drop_peer(peer)
        self._entries[peer] = pull.apply(self.tree, peer)
        last = pull.seq
        for seq, apply in sorted(pull.events, key=lambda e: e[0]):
            if seq > pull.seq:  # after the snapshot: re-applied on top of it
                apply()
                last = max(last, seq)
        if pull.overflow:
            self._applied.pop(peer, None)  # events were lost: sync again
        else:
            self._applied[peer] = last
        self.counters.add("syncs_done")

    def apply_event(self, peer: str, seq: Any, apply: Callable[[], Any]) -> None:
        apply()
        pull = self._syncs.get(peer)
        if pull is not None:
            pull.event(seq, apply)
        last = self._applied.get(peer)
        if not isinstance(seq, int) or last is None or seq != last + 1:
            self.request_sync(peer)  # a gap: what we know of this peer may be stale
        if isinstance(seq, int) and (last is None or seq > last):
            self._applied[peer] = seq

    def check_seq(self, peer: str, seq: Any) -> None:
        """A heartbeat says ``peer`` sent ``seq`` events: sync if we applied fewer."""
        if isinstance(seq, int) and seq > self._applied.get(peer, -1):
            self.request_sync(peer)

    def _add_chains(self, peer: str, chains: list[list[list[int]]]) -> None:
        """Index ``peer``'s announced chains; one that disagrees with the tree, or would
        take ``peer`` past ``MAX_REMOTE_ENTRIES``, is refused (counted)."""
        nodes = self.tree.nodes
        for keys, held in chains:
            if chain_conflicts(self.tree, keys):  # checked per chain: earlier ones grew the tree
                self.counters.add("refused_chain_conflicts")
                continue
            new = sum(1 for i in held if (n := nodes.get(keys[i])) is None or peer not in n.owners)
            if self._entries.get(peer, 0) + new > MAX_REMOTE_ENTRIES:
                self.counters.add("refused_index_full")
                continue
            self.tree.add_owner_chain(keys, held, peer)
            self._entries[peer] = self._entries.get(peer, 0) + new
            both = [n for i in held if (n := nodes.get(keys[i])) is not None
                    and n.value is not None and n.designated]
            if both:
                self.reconsider(both)

    def _remove_keys(self, peer: str, keys: list[int]) -> None:
        n = self.tree.remove_owner_keys(keys, peer)
        self._entries[peer] = max(0, self._entries.get(peer, 0) - n)
        nodes = self.tree.nodes
        left = [x for k in keys if (x := nodes.get(k)) is not None
                and x.value is not None and not x.designated]
        if left:
            self.reconsider(left)

    # -- broker thread: handlers -------------------------------------------------------------

    def handlers(self) -> dict[str, Callable[[Request], None]]:
        return {"announce": self.on_announce, "evicted": self.on_evicted, "sync": self.on_sync}

    def on_announce(self, req: Request) -> None:
        peer = self.known_sender(req)
        if peer is None:
            return
        chains = req.msg.header.get("chains")
        why = chains_error(chains)
        if why is not None:
            self.counters.add("malformed")
            req.error(f"announce: {why}")
            return
        seq = req.msg.header.get("seq")
        if self.jobs.submit(lambda: self.apply_event(peer, seq, lambda: self._add_chains(peer, chains))):
            req.reply("ok")
        else:
            req.error("announce: busy (too many requests queued); retried by a later sync")

    def on_evicted(self, req: Request) -> None:
        peer = self.known_sender(req)
        if peer is None:
            return
        keys = req.msg.header.get("keys")
        why = check_keys(keys)
        if why is not None:
            self.counters.add("malformed")
            req.error(f"evicted: {why}")
            return
        seq = req.msg.header.get("seq")
        if self.jobs.submit(lambda: self.apply_event(peer, seq, lambda: self._remove_keys(peer, keys))):
            req.reply("ok")
        else:
            req.error("evicted: busy (too many requests queued); retried by a later sync")

    def on_sync(self, req: Request) -> None:
        # Index metadata only (keys, no KV): answered to any authenticated caller.
        h = req.msg.header
        why = valid_request(h)
        if why is not None:
            self.counters.add("malformed")
            req.error(why)
            return
        peer, sid, cursor = h["from"], h.get("sync"), h.get("cursor", 0)
        if sid is not None:  # a later page: from the snapshot, on this thread
            page = self.snapshots.page(sid, peer, cursor, self.page_records)
            if isinstance(page, str):
                req.error(page)
            else:
                req.reply("index", page)
            return

        def first() -> None:
            snap = snapshot(self.tree, peer, self.seq)
            if not snap.keys:
                req.reply("index", snap.page("", 0, self.page_records))
                return
            sid = self.snapshots.add(snap)
            page = self.snapshots.page(sid, peer, 0, self.page_records)
            assert not isinstance(page, str)
            req.reply("index", page)

        if not self.jobs.submit(first):
            req.error("sync: busy (too many requests queued); try again")


def chain_conflicts(tree: Any, keys: list[int]) -> bool:
    """Does a key of the chain ``keys`` name a known node elsewhere in the tree?

    A key names its whole prefix, so a chain that disagrees with the tree is a
    64-bit collision or a bogus message: it is not applied (every node is
    indexed by key and must stay at one place)."""
    parent = tree.root
    for k in keys:
        n = tree.nodes.get(k)
        if n is not None and n.parent is not parent:
            return True
        parent = n
    return False


def chains_error(chains: Any) -> Optional[str]:
    """Why ``chains`` (``[[keys], [held indices]]`` lists) is malformed, or None."""
    if not isinstance(chains, list) or not chains:
        return "chains must be a non-empty list of [[keys], [indices]]"
    total = 0
    for c in chains:
        if not (isinstance(c, list) and len(c) == 2 and isinstance(c[1], list)):
            return "chains must be [[keys], [indices]] lists"
        why = check_keys(c[0])
        if why is not None:
            return why
        total += len(c[0])
        if total > MAX_MESSAGE_KEYS:
            return f"more than {MAX_MESSAGE_KEYS} keys in one announce"
        if not c[1] or not int_list(c[1]) or len(set(c[1])) != len(c[1]) or any(
                not 0 <= i < len(c[0]) for i in c[1]):
            return "held indices must be distinct positions in their chain"
    return None


def valid_chains(chains: Any) -> bool:
    return chains_error(chains) is None
