"""Per-request dispatch: which replica serves each cached segment, and how.

A request runs on one worker, the *executor*. Each segment of its cached prefix
is served in one of four modes::

    LOCAL       the executor holds the segment: no bytes move
    SHIP_QUERY  the executor sends its queries to the owner, which returns partial
                attention output + LSE; bytes per owner touched, per layer:
                (2 * q_heads * head_dim * dtype + 4 * q_heads) * (new + output tokens)
                (every prefill token and every decode step, both ways)
    PULL_KV     the owner sends the segment's K and V once; bytes per layer:
                2 * kv_heads * head_dim * dtype * segment_size
    RECOMPUTE   nobody holds it (or moving it costs more time than computing it):
                the executor prefills those tokens again

``plan`` works in three steps:

1. LOCAL for segments the executor holds; RECOMPUTE for segments nobody holds.
2. Every other segment is assigned one of its replicas so that the largest
   owner load (``loads`` plus one ``unit`` of serving work per segment) is as
   small as possible: a bipartite *semi-matching* of segments to replicas.
   Greedy least-loaded placement (most constrained segments first) is improved
   along alternating paths: a segment moves from worker ``u`` to another of its
   replicas, displacing one there, and so on, until a worker ``y`` is reached
   with ``load(y) + unit < load(u)``. At the end no such path exists from any
   worker. Bound: let ``u`` carry the maximum ``M`` and ``S`` be the workers
   reachable from ``u``; every segment assigned inside ``S`` has all its replicas
   in ``S`` and every ``y`` in ``S`` has ``load(y) > M - unit``. Any assignment must
   put those segments inside ``S``, so ``OPT >= mean load over S > M - unit``:
   the result is within one segment's serving work of the optimal makespan, and
   exactly optimal when the initial loads are equal (Harvey, Ladner, Lovász &
   Tamir, "Semi-matchings for bipartite graphs and load balancing", 2003: no
   cost-reducing path is the optimality condition).
3. Per owner, the mode that takes the least *time* (``Costs``; ties pull: pulled
   KV is reused by every later step)::

       SHIP      = batch x RTT x layers x (prefill passes + expected decode steps)
                   + query bytes / bandwidth + owner attention compute
       PULL      = RTT + KV bytes / bandwidth
                   + memory: under pressure a pulled copy displaces cached
                     segments, charged as their expected recompute
       RECOMPUTE = batch x tokens x prefill seconds per token

   ``batch`` (``Costs.batch``) counts the requests in the executor's running batch,
   this one included: a shipped layer's wait and a prefill pass stall every one of
   them, while a pull moves on the pool's broker thread before the request runs.

   RTT and bandwidth are per owner (``Costs.links``, measured by the live pool);
   the defaults are priors until measurements exist.

Plain Python: no torch, sglang or zmq.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class Mode(enum.Enum):
    LOCAL = "local"
    SHIP_QUERY = "ship_query"
    PULL_KV = "pull_kv"
    RECOMPUTE = "recompute"


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of the served model (defaults: a Llama-3-8B-like GQA model, bf16)."""

    layers: int = 32
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of K and V for ``tokens`` tokens over all layers (what PULL_KV moves)."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes * tokens * self.layers

    def query_bytes(self, tokens: int) -> int:
        """Bytes SHIP_QUERY moves per owner for ``tokens`` query tokens over all layers.

        Queries out and partial outputs back (``q_heads * head_dim`` each, model dtype)
        plus one fp32 LSE per head back.
        """
        per_token = 2 * self.q_heads * self.head_dim * self.dtype_bytes + 4 * self.q_heads
        return per_token * tokens * self.layers


class Link(NamedTuple):
    """One owner as seen from the executor."""

    rtt_s: float
    bandwidth_Bps: float
    ship_rtt_s: float = 0.0
    """Measured seconds from shipping one layer's queries to this owner to its partial
    (its queueing and compute included); 0 while unmeasured (``rtt_s`` is used)."""


@dataclass(frozen=True)
class Costs:
    """What moving and computing cost. Defaults are priors (25 GB/s links with 10 us
    round trips, an A100 prefilling an 8B model); the live pool replaces them with
    what it measures (``pool/calibration.py``)."""

    bandwidth_Bps: float = 25e9
    """Bytes per second one transfer between two workers gets."""
    recompute_s_per_token: float = 1.03e-4
    """Seconds of executor compute to prefill one token again."""
    attn_s_per_token_pair: float = 3.4e-9
    """Seconds of owner compute per (query token x cached token) of partial attention."""
    rtt_s: float = 1e-5
    """Seconds of one request/reply round trip to an owner (shipping pays one per layer
    per forward pass)."""
    links: Mapping[str, Link] = field(default_factory=dict)
    """Per-owner round trip and bandwidth where measured (else the two above)."""
    memory_pressure: float = 0.0
    """Fraction (0..1) of a pulled copy's memory the executor must free by evicting
    cached segments."""
    evicted_reuse: float = 0.5
    """Chance that an evicted segment is needed again (its recompute is charged)."""
    batch: int = 1
    """Requests whose forward passes a shipped layer's wait or a recompute stalls: the
    executor's running batch, this request included (pulls stall none)."""

    def link(self, worker: str) -> Link:
        got = self.links.get(worker)
        return got if got is not None else Link(self.rtt_s, self.bandwidth_Bps)

    def pull_s(self, shape: ModelShape, tokens: int, worker: str = "") -> float:
        """Seconds to pull ``tokens`` tokens of KV from ``worker``, memory included."""
        rtt, bw, _ = self.link(worker)
        memory = (self.memory_pressure * self.evicted_reuse * tokens
                  * self.recompute_s_per_token)
        return rtt + shape.kv_bytes(tokens) / bw + memory

    def ship_s(self, shape: ModelShape, worker: str, query_tokens: int, passes: int,
               cached_tokens: int) -> float:
        """Seconds to ship ``query_tokens`` queries over ``passes`` forward passes to
        ``worker``, which attends them to ``cached_tokens`` of its segments."""
        rtt, bw, ship_rtt = self.link(worker)
        stall = max(rtt, ship_rtt) * shape.layers * passes * max(self.batch, 1)
        return (stall + shape.query_bytes(query_tokens) / bw
                + self.attn_s_per_token_pair * query_tokens * cached_tokens)

    def recompute_s(self, tokens: int) -> float:
        return tokens * self.recompute_s_per_token * max(self.batch, 1)


def pull_pressure(remote_tokens: int, free_tokens: int) -> float:
    """``Costs.memory_pressure`` of a request whose cached prefix has ``remote_tokens``
    tokens held elsewhere, on an executor with ``free_tokens`` free KV slots: the part
    of pulling them all that must be freed by evicting cached segments (0..1). The live
    pool and the simulator both charge pulls with it."""
    if remote_tokens < 0 or free_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got {remote_tokens}, {free_tokens}")
    short = remote_tokens - free_tokens
    return short / remote_tokens if remote_tokens and short > 0 else 0.0


class Assignment(NamedTuple):
    key: int
    worker: str
    """The worker that serves the segment (the executor for LOCAL and RECOMPUTE)."""
    mode: Mode


def balance(
    segments: Sequence[int],
    replicas: Mapping[int, Collection[str]],
    loads: Mapping[str, float],
    unit: float,
) -> dict[int, str]:
    """Assign each segment to one of its replicas, minimizing the largest load.

    Args:
        segments: keys to assign (each must have at least one replica).
        replicas: key -> workers holding it.
        loads: current load per worker (any unit; missing workers count as 0).
        unit: load one assigned segment adds to its worker (same unit as ``loads``).

    Returns:
        key -> worker, with the max of ``loads[w] + unit * (#segments on w)`` within
        ``unit`` of optimal (see the module docstring).
    """
    load: dict[str, float] = defaultdict(float)
    for w, x in loads.items():
        load[w] = float(x)
    on: dict[str, list[int]] = defaultdict(list)
    where: dict[int, str] = {}
    # Most constrained first; sorted replica ids make ties deterministic.
    choices = {k: sorted(replicas[k]) for k in segments}
    for k in sorted(segments, key=lambda k: len(choices[k])):
        if not choices[k]:
            raise ValueError(f"segment {k:#x} has no replica")
        w = min(choices[k], key=lambda w: (load[w], w))
        where[k] = w
        on[w].append(k)
        load[w] += unit
    if unit <= 0:
        return where
    # Improve along alternating paths; each move lowers sum(load^2), so this ends.
    for _ in range(4 * len(segments) + 4):
        if not _improve_once(choices, load, on, where, unit):
            break
    return where


def _improve_once(choices, load, on, where, unit) -> bool:
    for u in sorted((w for w in on if on[w]), key=lambda w: (-load[w], w)):
        parent: dict[str, tuple[str, int]] = {}
        frontier, seen = [u], {u}
        while frontier:
            nxt = []
            for x in frontier:
                for k in on[x]:
                    for y in choices[k]:
                        if y in seen:
                            continue
                        seen.add(y)
                        parent[y] = (x, k)
                        if load[y] + unit < load[u] - 1e-12 * max(1.0, abs(load[u])):
                            _shift(parent, y, u, on, where)
                            load[u] -= unit
                            load[y] += unit
                            return True
                        nxt.append(y)
            frontier = nxt
    return False


def _shift(parent, y, u, on, where) -> None:
    while y != u:
        x, k = parent[y]
        on[x].remove(k)
        on[y].append(k)
        where[k] = y
        y = x


def plan(
    request_segments: Sequence[int],
    locations: Mapping[int, Collection[str]],
    loads: Mapping[str, float],
    *,
    executor: str,
    new_tokens: int,
    expected_output_tokens: int,
    segment_size: int,
    shape: ModelShape = ModelShape(),
    costs: Costs = Costs(),
    pin: Mode | None = None,
) -> list[Assignment]:
    """Serve every segment of a request's cached prefix: one ``Assignment`` per key, in order.

    Args:
        request_segments: the request's segment keys (prefix order).
        locations: key -> workers holding a copy (missing or empty: nobody).
        loads: owner load in seconds of queued work (balancing weight).
        executor: the worker that runs the request.
        new_tokens: tokens the request prefills (its uncached suffix).
        expected_output_tokens: decode steps expected (each ships queries again).
        segment_size: tokens per segment.
        pin: ``SHIP_QUERY`` or ``PULL_KV`` serves every remote segment in that mode
            (``--tokenlake-remote-mode ship|pull``); None picks the least time per owner.

    The serving worker of every non-RECOMPUTE assignment holds the segment
    (``worker in locations[key]``).
    """
    if pin not in (None, Mode.SHIP_QUERY, Mode.PULL_KV):
        raise ValueError(f"pin must be SHIP_QUERY, PULL_KV or None, got {pin!r}")
    steps = max(expected_output_tokens, 0)
    query_tokens = max(new_tokens, 1) + steps
    passes = 1 + steps
    # One segment's work for its owner, in the mode a lone segment would take.
    if pin is Mode.SHIP_QUERY or pin is None and (
            costs.ship_s(shape, "", query_tokens, passes, segment_size)
            < costs.pull_s(shape, segment_size)):
        unit = costs.attn_s_per_token_pair * query_tokens * segment_size
    else:
        unit = shape.kv_bytes(segment_size) / costs.bandwidth_Bps

    remote: list[int] = []
    for k in request_segments:
        holders = locations.get(k) or ()
        if holders and executor not in holders:
            remote.append(k)
    where = balance(remote, {k: locations[k] for k in remote}, loads, unit) if remote else {}

    per_owner: dict[str, int] = defaultdict(int)
    for w in where.values():
        per_owner[w] += 1
    mode_of: dict[str, Mode] = {}
    for w, n in per_owner.items():
        if pin is not None:
            mode_of[w] = pin
            continue
        tokens = n * segment_size
        times = [(costs.pull_s(shape, tokens, w), 0, Mode.PULL_KV),
                 (costs.ship_s(shape, w, query_tokens, passes, tokens), 1, Mode.SHIP_QUERY),
                 (costs.recompute_s(tokens), 2, Mode.RECOMPUTE)]
        mode_of[w] = min(times)[2]

    out: list[Assignment] = []
    for k in request_segments:
        holders = locations.get(k) or ()
        if executor in holders:
            out.append(Assignment(k, executor, Mode.LOCAL))
        elif not holders:
            out.append(Assignment(k, executor, Mode.RECOMPUTE))
        else:
            w = where[k]
            m = mode_of[w]
            out.append(Assignment(k, executor if m is Mode.RECOMPUTE else w, m))
    return out
