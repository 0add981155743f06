"""Instances as queues of GPU work, so load and queueing emerge from arrivals.

Each instance is one FIFO server of GPU seconds. A request admitted at ``now``
starts when the GPU has worked off what was admitted before it
(``start = max(now, free_at)``) and occupies it for its prefill plus its share
of the decode steps (``ComputeModel.decode_work_s``): continuous batching
interleaves many requests, but the GPU seconds they need add up, and a request
waits for the backlog in front of it. Partial attention an instance computes
for other workers' queries (TokenLake's SHIP_QUERY) is charged the same way.

Its first token comes ``prefill_s`` after it starts (and after its pulled KV
arrived); it stays *in flight* (what the router counts as load) until its last
token, ``output_tokens * tpot`` later, where the batch size is the number of
requests in flight on that instance.

Memory: from its start to its last token a request holds ``kv_tokens`` of its
instance's KV memory (its prompt and output); ``kv_changes`` reports, at each new
arrival, the instances whose running KV changed, so the caches can shrink or grow.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

from sglang_tokenlake.sim.compute import ComputeModel


class Admission(NamedTuple):
    """When a request admitted by ``Cluster.run`` waits, starts and ends."""

    wait: float
    """Seconds from arrival to start (the backlog in front of it)."""
    ttft: float
    """Seconds from arrival to its first token."""
    start: float
    end: float
    """Its last token (it holds its KV until then)."""


class Instance:
    __slots__ = ("id", "free_at", "busy_s", "remote_s", "ends", "served")

    def __init__(self, wid: str) -> None:
        self.id = wid
        self.free_at = 0.0
        self.busy_s = 0.0  # GPU seconds of all work charged here
        self.remote_s = 0.0  # of which partial attention for other executors
        self.ends: list[float] = []  # heap of in-flight requests' end times
        self.served = 0

    def backlog(self, now: float) -> float:
        """GPU seconds queued ahead of a request admitted at ``now``."""
        return self.free_at - now if self.free_at > now else 0.0

    def inflight(self, now: float) -> int:
        """Requests routed here and not finished at ``now``."""
        ends = self.ends
        while ends and ends[0] <= now:
            heapq.heappop(ends)
        return len(ends)


class Cluster:
    """``n`` equal instances with ids ``w00``, ``w01``, ..."""

    def __init__(self, n: int, compute: ComputeModel) -> None:
        self.compute = compute
        width = max(2, len(str(n - 1)))
        self.instances = [Instance(f"w{i:0{width}d}") for i in range(n)]
        self.ids = [x.id for x in self.instances]
        self.running_kv = [0] * n  # KV tokens held by started, unfinished requests
        self._kv_events: list[list[tuple[float, int]]] = [[] for _ in range(n)]
        """Per instance, a heap of (time, +/- tokens)."""

    def __len__(self) -> int:
        return len(self.instances)

    def kv_changes(self, now: float) -> dict[int, int]:
        """Apply the KV holds that began or ended by ``now``; return instance -> running KV
        tokens for the instances whose running KV changed."""
        due = sorted((ev[0][0], i) for i, ev in enumerate(self._kv_events) if ev and ev[0][0] <= now)
        return {i: self.kv_advance(i, now) for _, i in due}  # in the order of their first change

    def kv_advance(self, i: int, t: float) -> int:
        """Apply instance ``i``'s KV holds that began or ended by ``t``; return its running
        KV tokens."""
        ev, kv = self._kv_events[i], self.running_kv
        while ev and ev[0][0] <= t:
            kv[i] += heapq.heappop(ev)[1]
        return kv[i]

    def kv_next(self, i: int) -> tuple[float, bool]:
        """When instance ``i``'s running KV changes next (``inf``: nothing pending), and
        whether that change frees KV."""
        ev = self._kv_events[i]
        return (ev[0][0], ev[0][1] < 0) if ev else (math.inf, False)

    def kv_step(self, i: int) -> int:
        """Apply instance ``i``'s next KV change alone; return its running KV tokens."""
        self.running_kv[i] += heapq.heappop(self._kv_events[i])[1]
        return self.running_kv[i]

    def inflights(self, now: float) -> list[int]:
        return [x.inflight(now) for x in self.instances]

    def run(self, i: int, now: float, *, new_tokens: int, local_ctx: int, decode_ctx: int,
            output_tokens: int, transfer_s: float = 0.0,
            kv_tokens: int = 0) -> Admission:
        """Admit a request on instance ``i``; return when it waits, starts and ends.

        Args:
            new_tokens: tokens it prefills.
            local_ctx: cached tokens its prefill attends to on this GPU.
            decode_ctx: KV tokens each decode step reads on this GPU.
            transfer_s: seconds until pulled KV has arrived (overlaps the queue wait).
            kv_tokens: KV memory it holds from its start to its last token.
        """
        c = self.compute
        x = self.instances[i]
        batch = x.inflight(now) + 1
        prefill = c.prefill_s(new_tokens, local_ctx)
        work = prefill + c.decode_work_s(output_tokens, decode_ctx, batch)
        start = x.free_at if x.free_at > now else now
        x.free_at = start + work
        x.busy_s += work
        x.served += 1
        ready = max(start, now + transfer_s)
        ttft = ready - now + prefill
        end = ready + prefill + output_tokens * c.tpot_s(decode_ctx, batch)
        heapq.heappush(x.ends, end)
        if kv_tokens > 0:
            heapq.heappush(self._kv_events[i], (start, kv_tokens))
            heapq.heappush(self._kv_events[i], (end, -kv_tokens))
        return Admission(start - now, ttft, start, end)

    def charge(self, i: int, now: float, seconds: float) -> None:
        """Queue ``seconds`` of GPU work on instance ``i`` for another executor's request."""
        x = self.instances[i]
        x.free_at = (x.free_at if x.free_at > now else now) + seconds
        x.busy_s += seconds
        x.remote_s += seconds
