"""Serving peers' reads and writes of this worker's segments.

``get``: the KV and tokens of the requested segments this worker holds, gathered
on the broker thread under the slot mutex; the scheduler thread then marks them
used (``mark_served``), as a local hit would. ``put``: segments whose home is this
worker, or last copies another worker spilled here (``spill.py``; stored as old as
they were there), checked (key chain, tokens, sizes) on the broker thread and
stored on the scheduler thread, within a bound on the KV bytes queued.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

from sglang_tokenlake import kvio
from sglang_tokenlake.counters import Counters
from sglang_tokenlake.pool.identity import put_key_mismatch
from sglang_tokenlake.pool.index import IndexSync, chain_conflicts
from sglang_tokenlake.pool.limits import MAX_PENDING_PUT_BYTES, JobGate, check_keys, int_list
from sglang_tokenlake.pool.surfaces import CacheHost
from sglang_tokenlake.transport.broker import Request


def wire_tensor(buf: memoryview) -> torch.Tensor:
    """A received buffer as an aligned, writable uint8 tensor: the buffer itself when it
    is both (the KV stream's), else a copy (ZeroMQ's frames are read-only)."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    if arr.flags.writeable and arr.ctypes.data % 16 == 0:
        return torch.from_numpy(arr)
    out = torch.empty(buf.nbytes, dtype=torch.uint8)
    out.numpy()[:] = arr
    return out


class SegmentServer:
    """The ``get`` and ``put`` handlers of one worker (broker thread).

    Args:
        host: the worker's cache.
        index: announces the segments stored here.
        counters: the pool's counters.
        known_sender: the sender of a request if it is a live member, else None.
    """

    def __init__(self, host: CacheHost, index: IndexSync, counters: Counters,
                 known_sender: Callable[[Request], Optional[str]],
                 clock_at: Optional[Callable[[float], int]] = None) -> None:
        self.host = host
        self.clock_at = clock_at  # tree clock some seconds ago (a put's ``age``)
        self.tree = host.tree
        self.index = index
        self.counters = counters
        self.known_sender = known_sender
        self.S = host.segment_size
        self.kvcache = host.kv_store()
        self.layout = kvio.layout_of(self.kvcache)
        self.seg_bytes = self.S * self.layout.bytes_per_token()
        self.puts = JobGate(host.submit, MAX_PENDING_PUT_BYTES, counters)  # KV bytes queued
        # Keys sent to peers, for the scheduler thread (bounded: an idle scheduler loses
        # only the oldest touches).
        self.served: deque[list[int]] = deque(maxlen=4096)

    def on_get(self, req: Request) -> None:
        keys = req.msg.header.get("keys")
        if self.known_sender(req) is None:
            return
        why = check_keys(keys)
        if why is not None:
            self.counters.add("malformed")
            req.error(f"get: {why}")
            return
        found, toks, bufs = [], [], []
        with self.host.slot_mutex:
            for k in keys:
                node = self.tree.nodes.get(k)
                value = node.value if node is not None else None
                if value is None:
                    found.append(False)
                    continue
                base, off = value
                bufs.append(kvio.gather(self.kvcache, base[off : off + self.S]).numpy())
                toks.append(node.tokens)
                found.append(True)
        if bufs:
            self.served.append([k for k, f in zip(keys, found) if f])
        self.counters.add("served_segments", len(bufs))
        self.counters.add("served_bytes", sum(b.nbytes for b in bufs))
        req.reply("kv", {"found": found, "tokens": toks}, bufs)

    def mark_served(self) -> None:
        """Scheduler thread: the copies peers pulled since the last call were used now.
        A segment the pool uses only through pulls stays as recent at its owner as one
        used locally; else the owner evicts the pool's hottest segments first."""
        nodes = []
        while self.served:
            for k in self.served.popleft():
                node = self.tree.nodes.get(k)
                if node is not None and node.value is not None:
                    nodes.append(node)
        if nodes:
            self.tree.used(nodes)

    def on_put(self, req: Request) -> None:
        if self.known_sender(req) is None:
            return
        h, bufs = req.msg.header, req.msg.buffers
        keys, segs, toks, age = h.get("keys"), h.get("segs"), h.get("tokens"), h.get("age")
        hops = h.get("hops")
        ok = (
            (age is None or (isinstance(age, (int, float)) and 0 <= age < math.inf))
            and (hops is None or (int_list(hops) and len(hops) == len(segs or ())
                                  and min(hops, default=0) >= 0))
            and check_keys(keys) is None and int_list(segs) and len(set(segs)) == len(segs)
            and isinstance(toks, list) and len(toks) == len(segs) == len(bufs)
            and all(0 <= i < len(keys) for i in segs)
            and all(isinstance(t, bytes) and len(t) == self.S * 8 for t in toks)
            and all(b.nbytes == self.seg_bytes for b in bufs)
        )
        if not ok:
            self.counters.add("malformed")
            req.error("put: malformed segments (keys, segs, tokens, KV buffers and hops "
                      "must agree; age, if given, seconds >= 0; hops counts >= 0)")
            return
        bad = put_key_mismatch(keys, segs, toks, self.S, h.get("seed"))
        if bad is not None:  # a key that is not its tokens' chained hash: nothing is stored
            self.counters.add("refused_put_key")
            req.error(f"put: the key of segment {bad} does not match its tokens")
            return
        datas = [wire_tensor(b) for b in bufs]

        def job() -> None:
            stored, held = 0, []
            if chain_conflicts(self.tree, keys):
                self.counters.add("refused_chain_conflicts")
                req.error("put: the key chain disagrees with this worker's tree")
                return
            for j, (i, tok, data) in enumerate(zip(segs, toks, datas)):
                node = self.tree.nodes.get(keys[i])
                if node is not None and node.value is not None:
                    if not node.designated:
                        self.tree.set_designated(node, True)
                        self.index.announce_node(node)
                    held.append(i)
                    continue
                slots = self.host.alloc_slots(self.S)
                if slots is None:
                    self.counters.add("put_refused_full")
                    break
                kvio.scatter(self.kvcache, slots, data, self.layout)
                old = (self.clock_at(float(age))  # as old as at its sender
                       if age is not None and self.clock_at is not None else None)
                node, _ = self.tree.adopt(keys[: i + 1], (slots, 0), tok, designated=True,
                                          last_access=old)
                if hops and hops[j]:  # handed over by spilling (reset by a use)
                    node.spilled = (hops[j], node.last_access)
                self.index.announce(list(keys[: i + 1]), [i])
                stored += 1
                held.append(i)
            self.counters.add("stored_segments", stored)
            req.reply("ok", {"stored": stored, "held": held})

        if not self.puts.submit(job, sum(b.nbytes for b in bufs)):
            req.error("put: busy (too much KV queued for this worker); try again later")
