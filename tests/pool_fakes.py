"""Fakes for unit tests of the live pool (sglang_tokenlake/pool/) without SGLang or servers.

``FakeHost`` is a worker's cache: a real ``SegmentTree`` over a fake KV memory
(per-layer K/V tensors, slot 0 the padding slot) with a plain free list.
``FakeNet`` joins ``PoolLink`` objects in one process: ``FakeAgent.request``
hands the message (header and buffers copied, as the wire would) straight to
the receiver's handler and resolves the future with its reply. Work a handler
queues for the scheduler thread (``submit``) runs at once, as on an idle
scheduler; a peer marked down times out.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Optional

import torch

from sglang_tokenlake.config import TokenLakeConfig
from sglang_tokenlake.pool import PoolLink
from sglang_tokenlake.segments import keys_from_bytes, namespace_seed, segment_bytes
from sglang_tokenlake.stats import CacheStats
from sglang_tokenlake.transport.frames import Message
from sglang_tokenlake.transport.peers import PeerError
from sglang_tokenlake.tree import SegmentNode, SegmentTree

LAYERS, KV_HEADS, Q_HEADS, DIM = 2, 2, 4, 8
SEED = namespace_seed("fake-model")


class FakeKV:
    """Per-layer K and V buffers ``[slots, kv_heads, head_dim]`` (float32)."""

    def __init__(self, slots: int) -> None:
        self.k_buffer = [torch.zeros(slots, KV_HEADS, DIM) for _ in range(LAYERS)]
        self.v_buffer = [torch.zeros(slots, KV_HEADS, DIM) for _ in range(LAYERS)]

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[layer_id]


def kv_of(tokens: Sequence[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V a model would compute for ``tokens`` at ``layer``: row ``i`` depends on
    token ``i`` and its position only, so a prefix's KV is a prefix of the longer one's."""
    t = torch.tensor(list(tokens), dtype=torch.float64).view(-1, 1, 1)
    pos = torch.arange(len(tokens), dtype=torch.float64).view(-1, 1, 1)
    idx = torch.arange(KV_HEADS * DIM, dtype=torch.float64).view(1, KV_HEADS, DIM)
    k = torch.sin(0.37 * t + 0.11 * pos + 0.7 * layer + 1.3 * idx)
    v = torch.cos(0.23 * t - 0.17 * pos + 0.5 * layer + 0.9 * idx)
    return k.float(), v.float()


class FakeHost:
    """A worker's cache as the pool sees it (``pool.surfaces.CacheHost``)."""

    def __init__(self, segment_size: int, capacity: int) -> None:
        self.segment_size = segment_size
        self.tree = SegmentTree(segment_size)
        self.q_heads = Q_HEADS
        self.stats = CacheStats()
        self.slot_mutex = threading.Lock()
        self.capacity = capacity
        self.kv = FakeKV(capacity + 1)  # slot 0: padding, never handed out
        self.free = list(range(1, capacity + 1))
        self.rows = torch.zeros(8, 4096, dtype=torch.int32)
        self.queued = 0
        self.running = 0
        self.pool: Optional[PoolLink] = None
        self.evicted: list[int] = []
        self.held: Optional[list[Callable[[], None]]] = None  # jobs of a busy scheduler

    # -- CacheHost ---------------------------------------------------------------------

    def kv_store(self) -> FakeKV:
        return self.kv

    def req_to_token(self) -> torch.Tensor:
        return self.rows

    def capacity_tokens(self) -> int:
        return self.capacity

    def free_tokens(self) -> int:
        return len(self.free)

    def queued_tokens(self) -> int:
        return self.queued

    def running_requests(self) -> int:
        return self.running

    def alloc_slots(self, n: int) -> Optional[torch.Tensor]:
        if len(self.free) < n:
            self.evict(n - len(self.free))
        if len(self.free) < n:
            return None
        out, self.free = self.free[:n], self.free[n:]
        return torch.tensor(out, dtype=torch.int64)

    def drop_nodes(self, nodes: list[SegmentNode]) -> None:
        for n in nodes:
            base, off = self.tree.drop(n)
            self.free.extend(base[off : off + self.segment_size].tolist())
        self.stats.count_evicted(nodes)

    def submit(self, fn: Callable[[], None]) -> None:
        if self.held is not None:
            self.held.append(fn)  # the scheduler is busy: runs at run_held()
        else:
            fn()

    def run_held(self) -> None:
        jobs, self.held = self.held or [], None
        for fn in jobs:
            fn()

    def flush(self) -> None:
        """SGLang's flush_cache, as TokenLakeCache.reset does it: every slot back to the
        allocator, a new tree."""
        if self.pool is not None:
            self.pool.flush(self.tree.reset)
        else:
            self.tree.reset()
        self.free = list(range(1, self.capacity + 1))

    # -- what the adapter does around the pool -------------------------------------------

    def evict(self, tokens: int) -> list[SegmentNode]:
        hooks = self.pool.eviction_hooks() if self.pool is not None else {}
        if self.pool is not None:
            self.pool.before_free(tokens)
        dropped = self.tree.evict(tokens, **hooks)
        for node, (base, off) in dropped:
            self.free.extend(base[off : off + self.segment_size].tolist())
            self.evicted.append(node.key)
        self.stats.count_evicted([n for n, _ in dropped])
        if self.pool is not None:
            self.pool.on_evicted([n for n, _ in dropped])
        return [n for n, _ in dropped]

    def compute(self, tokens: Sequence[int]) -> list[int]:
        """Prefill ``tokens`` here (write their KV) and insert their full segments, as
        ``TokenLakeCache.checkpoint`` does; returns the chain's keys."""
        S = self.segment_size
        raw = segment_bytes(tokens, S)
        keys = keys_from_bytes(raw, S, SEED)
        n = len(keys) * S
        path = self.tree.walk(keys)
        first_new = 0
        while first_new < len(path) and path[first_new].value is not None:
            first_new += 1
        slots = self.alloc_slots((len(keys) - first_new) * S)
        assert slots is not None, "fake worker out of memory"
        for layer in range(LAYERS):
            k, v = kv_of(list(tokens[:n]), layer)
            self.kv.k_buffer[layer][slots] = k[first_new * S : n]
            self.kv.v_buffer[layer][slots] = v[first_new * S : n]
        values: list[Any] = [None] * first_new + [(slots, (i - first_new) * S)
                                                   for i in range(first_new, len(keys))]
        out = self.tree.insert(keys, raw, values)
        if self.pool is not None:
            self.pool.on_inserted(keys, out, SEED)
        return keys

    def check(self) -> None:
        """Independent count: the tree's slots and the free list partition all slots."""
        self.tree.check()
        held: list[int] = []
        for n in self.tree.iter_nodes():
            if n.value is not None:
                base, off = n.value
                held.extend(base[off : off + self.segment_size].tolist())
        assert len(held) == len(set(held)), "a slot is held by two segments"
        assert not set(held) & set(self.free), "a slot is both free and held"
        assert len(self.free) == len(set(self.free)), "a slot is free twice"
        locked_by_nobody = self.capacity - len(held) - len(self.free)
        assert locked_by_nobody == 0, f"{locked_by_nobody} slots leaked"
        assert 0 not in held and 0 not in self.free


class FakeRequest:
    """A received message and the future its reply resolves (``transport.broker.Request``)."""

    def __init__(self, msg: Message, fut: Future) -> None:
        self.msg = msg
        self._fut = fut
        self.replied = False

    def reply(self, kind: str, header: Optional[dict[str, Any]] = None,
              buffers: Sequence[Any] = ()) -> None:
        assert not self.replied, "a request is answered once"
        self.replied = True
        if kind == "error":
            self._fut.set_exception(PeerError(str((header or {}).get("reason"))))
            return
        bufs = [memoryview(bytes(memoryview(b).cast("B"))) for b in buffers]
        self._fut.set_result(Message(kind, self.msg.id, copy.deepcopy(header or {}), bufs))

    def error(self, reason: str, **extra: Any) -> None:
        self.reply("error", {"reason": reason, **extra})


class FakeNet:
    """Links by member id; messages delivered synchronously; ``down`` peers time out."""

    def __init__(self) -> None:
        self.links: dict[str, PoolLink] = {}
        self.down: set[str] = set()
        self.dropped: Callable[[str, str, dict[str, Any]], bool] = lambda peer, kind, h: False
        self.sent: list[tuple[str, str, str]] = []  # (from, to, kind)
        self._ids = itertools.count()

    def heartbeat(self, rounds: int = 2) -> None:
        for _ in range(rounds):
            for link in list(self.links.values()):
                if link.self_id not in self.down:
                    link._tick()


class FakeAgent:
    """A ``PeerAgent`` over a ``FakeNet``."""

    def __init__(self, net: FakeNet, self_id: str) -> None:
        self.net = net
        self.self_id = self_id
        self.counters: dict[str, int] = {"sent": 0}
        self.streams: dict[str, int] = {}  # peer -> the KV stream port its heartbeats named

    def connect(self, peer: str, endpoint: str) -> None:
        pass

    def set_stream(self, peer: str, port: Optional[int]) -> None:
        if port is None:
            self.streams.pop(peer, None)
        else:
            self.streams[peer] = port

    def close(self) -> None:
        pass

    def request(self, peer: str, kind: str, header: Optional[dict[str, Any]] = None,
                buffers: Sequence[Any] = (), *, timeout: float = 5.0,
                direct: bool = False, bulk: bool = False) -> Future:
        fut: Future = Future()
        self.counters["sent"] += 1
        self.counters["direct_sent"] = self.counters.get("direct_sent", 0) + int(direct)
        self.counters["bulk_sent"] = self.counters.get("bulk_sent", 0) + int(bulk)
        h = copy.deepcopy(header or {})
        target = self.net.links.get(peer)
        if (target is None or peer in self.net.down or self.self_id in self.net.down
                or self.net.dropped(peer, kind, h)):
            fut.set_exception(TimeoutError(f"{kind} to {peer} timed out"))
            return fut
        self.net.sent.append((self.self_id, peer, kind))
        bufs = [memoryview(bytes(memoryview(b).cast("B"))) for b in buffers]
        req = FakeRequest(Message(kind, next(self.net._ids), h, bufs), fut)
        handler = target.handlers().get(kind)
        if handler is None:
            req.error(f"unknown kind {kind!r}")
        else:
            handler(req)  # type: ignore[arg-type]
        return fut


def make_pool(net: FakeNet, ids: Sequence[str], *, segment_size: int = 4, capacity: int = 64,
              **config: Any) -> dict[str, FakeHost]:
    """Workers ``ids`` joined over ``net`` (not yet heartbeating: call ``net.heartbeat()``)."""
    hosts = {}
    peers = ",".join(ids)
    for wid in ids:
        host = FakeHost(segment_size, capacity)
        cfg = TokenLakeConfig(segment_size=segment_size, peers=peers, **config)
        link = PoolLink(host, cfg, wid, agent=FakeAgent(net, wid))  # type: ignore[arg-type]
        host.pool = link
        net.links[wid] = link
        hosts[wid] = host
    return hosts
