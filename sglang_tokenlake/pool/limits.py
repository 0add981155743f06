"""Bounds on what one peer can make a worker hold or do, in one place.

Everything a peer sends is bounded before it is acted on; a request over a
bound is answered with an error naming the bound, and the worker keeps
serving. The sizes, and why they suffice for legitimate traffic:

``MAX_MESSAGE_KEYS``
    Keys in one ``get``, ``lease``, ``evicted`` or ``put``, and summed over the
    chains of one ``announce``: 65,536 keys (a 1M-token context at segment 16).
    A key is a uint64, at most 9 bytes of msgpack, so such a header stays near
    576 KiB, under ``frames.MAX_HEADER_BYTES`` (1 MiB). Senders split larger
    batches (``IndexSync.flush``). A key listed twice in one request is refused.
``MAX_HELLO_MEMBERS`` / ``MAX_MEMBER_ID``
    Members a heartbeat may list, and the length of one member id (``host:port``;
    a DNS name is at most 253 characters).
``MAX_MEMBERS``
    Members (seeds, learned ones, live ones) one worker keeps track of.
``MAX_PENDING_JOBS``
    Jobs broker handlers may have queued for the scheduler thread and not yet
    run; over it a request is refused as busy (counter ``refused_busy``).
``MAX_PENDING_PUT_BYTES``
    KV bytes of received puts waiting for the scheduler thread. One put is
    always admitted into an empty queue, so a legitimately large put is never
    refused forever; over it puts are refused as busy.
``MAX_REMOTE_ENTRIES``
    Segments one peer may have this worker index as its copies (announces and
    syncs over it are refused). 1M segments is 16M tokens at segment 16, more KV
    than any single GPU worker holds.
``SYNC_PAGE_RECORDS``
    Records in one page of a full index sync. A record is a key, its parent's
    key and a held flag: at most 9 + 9 + 1 bytes, so a page of 16,384 records
    is under 320 KiB of header.
``MAX_SYNC_SNAPSHOTS`` / ``SYNC_SNAPSHOT_TTL``
    Index snapshots an owner keeps for requesters paging through them (one per
    requester, the oldest dropped first), and how long an idle one lives.
``MAX_SYNC_BACKLOG``
    Index events a requester keeps while a sync of their sender is in flight,
    to re-apply after the sync's last page (beyond it the sync is redone).
``MAX_ATTEND_TOKENS``
    Queries of one ``attend`` message. A batch never ships more than SGLang's
    prefill chunk or running batch (tens of thousands of tokens).

The largest frame a worker's broker accepts (ZeroMQ ``MAXMSGSIZE``, checked
per frame before the frame is buffered) follows from them: see
``max_frame_bytes``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Optional

from sglang_tokenlake.counters import Counters
from sglang_tokenlake.hotness import HotView
from sglang_tokenlake.transport.frames import MAX_HEADER_BYTES

MAX_MESSAGE_KEYS = 1 << 16
MAX_HELLO_MEMBERS = 1024
MAX_MEMBER_ID = 261  # 253-character host name, ':', 5-digit port, brackets of IPv6
MAX_MEMBERS = 1024
MAX_PENDING_JOBS = 4096
MAX_PENDING_PUT_BYTES = 1 << 30
MAX_REMOTE_ENTRIES = 1 << 20
SYNC_PAGE_RECORDS = 1 << 14
MAX_SYNC_SNAPSHOTS = 16
SYNC_SNAPSHOT_TTL = 60.0
MAX_SYNC_BACKLOG = 4096
MAX_ATTEND_TOKENS = 1 << 16


def max_frame_bytes(segment_bytes: int, q_heads: int, head_dim: int) -> int:
    """The largest frame a legitimate peer sends this worker.

    Frames are the header (at most ``MAX_HEADER_BYTES``), one segment's KV per
    buffer of a ``put``, and the query buffer of an ``attend``
    (``MAX_ATTEND_TOKENS`` queries of ``q_heads`` x ``head_dim`` values, at most
    4 bytes each). Replies (``get``'s KV) arrive on the peer agent's sockets,
    not the broker's.
    """
    attend = MAX_ATTEND_TOKENS * max(1, q_heads) * max(1, head_dim) * 4
    return max(MAX_HEADER_BYTES, int(segment_bytes), attend) + 4096


def check_keys(keys: Any, limit: int = MAX_MESSAGE_KEYS, *, nonempty: bool = True) -> Optional[str]:
    """Why ``keys`` is not a valid key list of one request (None when it is):
    a list of 64-bit unsigned integers, at most ``limit`` of them, none twice."""
    if not isinstance(keys, list):
        return "keys must be a list of integers"
    if nonempty and not keys:
        return "keys must not be empty"
    if len(keys) > limit:
        return f"{len(keys)} keys exceed the limit of {limit} per request"
    for k in keys:
        if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 1 << 64):
            return "keys must be unsigned 64-bit integers"
    if len(set(keys)) != len(keys):
        return "a key is listed twice"
    return None


def valid_member_id(m: Any) -> bool:
    """A member id: ``host:port``, a port in 1..65535, bounded length."""
    if not isinstance(m, str) or not 3 <= len(m) <= MAX_MEMBER_ID:
        return False
    host, sep, port = m.rpartition(":")
    if not sep or not host or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        return False
    return all(c.isalnum() or c in ".-_[]:" for c in host)


def hello_members(members: Any, counters: Counters) -> list[Any]:
    """The member list of a heartbeat; none when malformed or over ``MAX_HELLO_MEMBERS``
    (counted: the heartbeat itself still counts). Each entry is checked by the caller."""
    if members is None:
        return []
    if not isinstance(members, list) or len(members) > MAX_HELLO_MEMBERS:
        counters.add("refused_hello_members")
        return []
    return members


class JobGate:
    """Scheduler jobs queued by broker handlers, bounded.

    ``submit`` queues ``fn`` with the host unless ``cost`` more would pass
    ``limit`` (a job is always admitted into an empty gate); it returns whether
    it did. A refused request should be answered as busy.

    Args:
        submit: queues a callable for the scheduler thread (``CacheHost.submit``).
        limit: the bound on the summed costs of queued, not yet run jobs.
        counters: the pool's counters (``refused_busy`` counts refusals).
    """

    def __init__(self, submit: Callable[[Callable[[], None]], None], limit: int,
                 counters: Counters) -> None:
        self._submit = submit
        self.limit = limit
        self.counters = counters
        self.pending = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None], cost: int = 1) -> bool:
        with self._lock:
            if self.pending and self.pending + cost > self.limit:
                self.counters.add("refused_busy")
                return False
            self.pending += cost

        def job() -> None:
            try:
                fn()
            finally:
                with self._lock:
                    self.pending -= cost

        self._submit(job)
        return True


def int_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def beacon_of(h: dict[str, Any], max_keys: int) -> Optional[dict[str, Any]]:
    """A peer's heartbeat fields, validated (None when absent or malformed). ``kv_port``:
    its KV stream's port, None when it has none (or names no valid port)."""
    hot, observed, requests = h.get("hot"), h.get("observed"), h.get("requests")
    horizon, load, port = h.get("horizon"), h.get("load"), h.get("kv_port")
    if not (isinstance(hot, list) and len(hot) == 2 and int_list(hot[0]) and int_list(hot[1])
            and len(hot[0]) == len(hot[1]) <= max_keys):
        return None
    if not (isinstance(observed, int) and isinstance(requests, int) and observed >= 0
            and requests >= 0 and isinstance(horizon, (int, float)) and isinstance(load, (int, float))):
        return None
    view: HotView = (dict(zip(hot[0], hot[1])), observed)
    valid_port = isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
    return {"horizon": float(horizon), "load": max(0.0, float(load)), "requests": requests,
            "hot_view": view, "kv_port": port if valid_port else None}
