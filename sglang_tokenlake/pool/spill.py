"""Spilling: the pool's last copy of a segment moves to older data instead of leaving.

A worker short of memory evicts its own least recently used segments. When one is
the pool's last copy (no other live member holds it), the pool loses it although
another member may hold data that nobody has used for much longer, for instance
when requests detour to one worker and the copies they bring evict its contexts.
``Spill`` sends such a segment to the member with the largest eviction horizon
instead, when ``PoolPolicy.spill_to`` finds that member's oldest data more than
``spill_margin`` times older than the segment. That member stores it as a ``put``
(at the segment's own age in its LRU order, ``age`` in the header) and evicts its
oldest data to make room, so the pool as a whole drops its least recently used
segments, as one LRU cache over all members' memory would. With ``spill_hops`` a
segment handed over that many times since a request last used it is dropped instead
(the count travels in the put header, ``hops``, and lives on the node, ``spilled``).

The KV is read while the segment is still in place (``before_drop``, called by the
tree's eviction under the slot mutex) and sent once the eviction is over (``send``).
The sender counts the target as an owner from then on; a put that fails removes it
again and loses that segment, as the eviction would have. Each member
receives at most ``SPILL_SHARE`` of its capacity per heartbeat interval: its
announced horizon does not see what was sent since.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Optional

import numpy as np

from sglang_tokenlake import kvio
from sglang_tokenlake.config import TokenLakeConfig
from sglang_tokenlake.counters import Counters
from sglang_tokenlake.policy import SPILL_SHARE, PoolPolicy, hops_since_use
from sglang_tokenlake.pool.surfaces import CacheHost, PoolView
from sglang_tokenlake.transport.peers import PeerAgent
from sglang_tokenlake.tree import SegmentNode

SEGMENTS_PER_PUT = 256  # segments of one chain sent in one put, at most


class Spill:
    """Hands this worker's evicted last copies to members with older data.

    Args:
        host: the worker's cache.
        view: members, their horizons and this worker's clock (the ``PoolLink``).
        policy: the pool's policy (``spill_to``).
        agent: requests to peers.
        config: the worker's TokenLake settings.
        counters: the pool's counters (``spilled_*``).
    """

    def __init__(self, host: CacheHost, view: PoolView, policy: PoolPolicy, agent: PeerAgent,
                 config: TokenLakeConfig, counters: Counters) -> None:
        self.host = host
        self.tree = host.tree
        self.view = view
        self.policy = policy
        self.agent = agent
        self.config = config
        self.counters = counters
        self.S = host.segment_size
        self.kvcache = host.kv_store()
        # (member, [chain keys], (tokens, KV bytes, age s, hops)), gathered during an eviction
        self._pending: list[tuple[str, list[int], tuple[bytes, np.ndarray, float, int]]] = []
        self._sent: dict[str, tuple[float, int]] = {}  # member -> (window start, tokens)

    def hook(self) -> Optional[Callable[[SegmentNode], None]]:
        """``SegmentTree.evict``'s ``before_drop`` hook: ``before_drop`` while spilling is
        on, else None (an eviction then does no work for it)."""
        return self.before_drop if self.policy.cfg.spill_margin > 0 else None

    def before_drop(self, node: SegmentNode) -> None:
        """Scheduler thread, under the slot mutex: ``node`` is about to be evicted."""
        if (not node.designated or node.value is None or node.tokens is None
                or any(self.view.usable(o) for o in node.owners)):
            return  # not the pool's last copy
        alive = self.view.alive()
        if len(alive) < 2:
            return
        now = time.monotonic()
        horizons = {m: h for m, h in self.view.horizons().items()
                    if m != self.view.self_id and m in alive and h == h and self.view.usable(m)
                    and self._room(m, alive[m], now)}
        age = self.view.age_of(node.last_access)
        hops = hops_of(node)
        target = self.policy.spill_to(age, horizons, hops)
        if target is None:
            return
        base, off = node.value
        buf = kvio.gather(self.kvcache, base[off : off + self.S]).numpy()
        keys = [n.key for n in self.tree.path_to(node)]
        self._pending.append((target, keys, (node.tokens, buf, age, hops + 1)))
        # The target holds it from now on as far as this worker knows: the node stays as
        # a remote entry (until the put fails), and its parent, the last copy of a
        # segment whose child is cached elsewhere, falls under the pool-wide leaf-first rule.
        node.owners.add(target)
        start, sent = self._sent[target]
        self._sent[target] = (start, sent + self.S)

    def _room(self, member: str, capacity: int, now: float) -> bool:
        start, sent = self._sent.get(member, (now, 0))
        if now - start >= self.config.heartbeat_interval:
            start, sent = now, 0
        self._sent[member] = (start, sent)
        return sent + self.S <= SPILL_SHARE * capacity

    def send(self) -> None:
        """Scheduler thread, after the eviction: put what ``before_drop`` gathered."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        by_target: dict[str, list[tuple[list[int], tuple]]] = defaultdict(list)
        for target, keys, seg in pending:
            by_target[target].append((keys, seg))
        for target, items in by_target.items():
            for chain, segs in chains(items):
                idxs = sorted(segs)
                for at in range(0, len(idxs), SEGMENTS_PER_PUT):
                    part = idxs[at : at + SEGMENTS_PER_PUT]
                    self._put(target, chain[: part[-1] + 1], part, [segs[i] for i in part])

    def _put(self, target: str, keys: list[int], idxs: list[int],
             segs: Sequence[tuple[bytes, np.ndarray, float, int]]) -> None:
        header = {"from": self.view.self_id, "keys": keys, "segs": idxs,
                  "tokens": [s[0] for s in segs], "age": min(s[2] for s in segs),
                  "hops": [s[3] for s in segs]}
        bufs = [s[1] for s in segs]
        fut = self.agent.request(target, "put", header, bufs,
                                 timeout=self.config.pull_timeout * 2)
        self.counters.add("spill_puts")
        self.counters.add("spilled_bytes", sum(b.nbytes for b in bufs))

        def done(f: Future) -> None:
            held = f.result().header.get("held") if f.exception() is None else None
            held = set(held) if isinstance(held, list) else set()
            failed = [keys[i] for i in idxs if i not in held]
            self.counters.add("spilled_segments", len(idxs) - len(failed))
            if failed:
                self.counters.add("spill_failures", len(failed))
                self.host.submit(lambda: self.tree.remove_owner_keys(failed, target))

        fut.add_done_callback(done)


def hops_of(node: SegmentNode) -> int:
    """Times ``node`` was handed over by spilling since a request last used it."""
    return hops_since_use(node.spilled, node.last_access)


def chains(items: Sequence[tuple[list[int], Any]]) -> list[tuple[list[int], dict[int, Any]]]:
    """Group segments (each with its key chain from the root) by the chain they lie on:
    ``(longest chain, {depth: segment})`` per group. A leaf-first eviction drops a
    chain's segments deepest first, so most of them join the first group."""
    groups: list[tuple[list[int], dict[int, Any]]] = []
    for keys, seg in items:
        d = len(keys) - 1
        for i, (chain, segs) in enumerate(groups):
            if d < len(chain) and chain[d] == keys[d]:  # on this chain
                segs[d] = seg
                break
            if len(chain) <= d and keys[len(chain) - 1] == chain[-1]:  # extends it
                segs[d] = seg
                groups[i] = (keys, segs)
                break
        else:
            groups.append((keys, {d: seg}))
    return groups
