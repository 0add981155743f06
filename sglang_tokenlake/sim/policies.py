"""The baselines the simulator compares TokenLake with (``Policy`` is their common base).

``stock``        per-instance radix LRU; round-robin routing (sglang-router ``round_robin``).
``cache_aware``  per-instance radix LRU; sglang-router 0.3.2's ``cache_aware`` rule with its
                 own approximate tree (``sim.routing.CacheAwareRouter``), load = in-flight
                 requests; a weak match goes to the least loaded worker.
``cache_aware_v019``  the same with the rule of sglang-router <= 0.1.9 (the paper's
                 baseline): thresholds 0.5 / 32 / 1.0001, weak match -> smallest tree.
``stock_bounded``  per-instance radix LRU behind the harness's ``bounded_load`` proxy
                 (``bench.proxy.Balancer``): each prefix on its homes, loads bounded.
``mooncake``     a shared external KV store in the Mooncake style: one deduplicated LRU with
                 the cluster's total capacity outside the GPUs; a request goes to the least
                 loaded instance and pulls its whole cached prefix from the store, then puts
                 its new full blocks back.
``tokenlake``    the pool: placement + heavy hitters + dispatch (``sim/tokenlake.py``).
``limit``        one deduplicated LRU with the total capacity, free to use from anywhere,
                 least-loaded routing: the hit rate a pool could reach at best.
``belady``       ``limit`` with the offline MIN eviction (``sim/belady.py``): the bound.

``PolicyConfig.eviction`` (``--eviction``) sets the order of the pooled caches (``tokenlake``,
``limit``, ``mooncake``): ``lru`` or ``aware`` (``sglang_tokenlake/eviction.py``).

All caches are block-level radix LRUs (``PrefixLRU``); a request hits the longest
prefix of its full blocks that its cache holds, then touches/inserts all of them.
With ``SimConfig.radix_nodes`` (the live replay) the per-instance caches are SGLang's
radix tree instead (``RadixNodeLRU``: whole nodes evicted, running prefixes locked), and with
``SimConfig.match_at_admission`` a request is matched against its worker's cache as it is
when the request starts (the worker's own events applied up to then).
Memory pressure (``Policy.pressure``): an instance's cache holds ``capacity_blocks``
less the blocks its running requests occupy; the pooled caches less the sum.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Optional

from sglang_tokenlake.bench.proxy import AFFINITY_TOKENS, Balancer
from sglang_tokenlake.sim.cache import PrefixLRU, new_cache
from sglang_tokenlake.sim.cluster import Cluster
from sglang_tokenlake.sim.model import Outcome, SimConfig
from sglang_tokenlake.sim.radix import Node, RadixNodeLRU
from sglang_tokenlake.sim.routing import CacheAwareConfig, CacheAwareRouter
from sglang_tokenlake.sim.workloads import Request


class Policy:
    """One way of running a cluster: picks the executor and serves the cached prefix."""

    name = "policy"
    pooled = True
    """Its cache is one for the whole cluster (a block computed anywhere serves every
    instance); False: each instance has its own."""

    def __init__(self, cfg: SimConfig, cluster: Cluster) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.seg = cfg.segment_size
        self._rr = 0

    def held(self, req: Request, full: Sequence[int], cache: PrefixLRU) -> int:
        """Prompt tokens of ``req`` outside ``cache`` after it was used (tail, evicted blocks)."""
        kept = len(full) if len(full) <= cache.capacity else sum(k in cache for k in full)
        return req.input_tokens - kept * self.seg

    def room(self, running_tokens: int, instances: int = 1) -> int:
        """Blocks a cache of ``instances`` instances' memory holds beside ``running_tokens``."""
        return max(0, self.cfg.capacity_blocks * instances - math.ceil(running_tokens / self.seg))

    def full(self, req: Request) -> Sequence[int]:
        return req.keys[: min(req.input_tokens // self.seg, len(req.keys))]

    def least_loaded(self, now: float, extra: Sequence[float] | None = None) -> int:
        """Instance with the least queued GPU work (+ ``extra``); ties rotate."""
        xs = self.cluster.instances
        n = len(xs)
        best, best_key = 0, None
        for j in range(n):
            i = (self._rr + j) % n
            key = xs[i].backlog(now) + (extra[i] if extra is not None else 0.0)
            if best_key is None or key < best_key:
                best, best_key = i, key
        self._rr += 1
        return best

    def serve(self, req: Request, now: float) -> Outcome:
        raise NotImplementedError

    def advance(self, now: float) -> None:
        """Time moves on to ``now`` (with ``SimConfig.memory_pressure``): the caches of the
        instances whose running KV changed since are resized (``pressure``)."""
        changed = self.cluster.kv_changes(now)
        if changed:
            self.pressure(changed, now)

    def pressure(self, running: Mapping[int, int], now: float) -> None:
        """Instances whose running requests hold ``running[i]`` KV tokens at ``now``: resize caches."""
        raise NotImplementedError

    def admitted(self, req: Request, out: Outcome, start: float, end: float) -> None:
        """``req``, served as ``out``, runs from ``start`` to its last token at ``end``."""

    def stats(self) -> dict:
        return {}


class Stock(Policy):
    name = "stock"
    pooled = False

    def __init__(self, cfg: SimConfig, cluster: Cluster) -> None:
        super().__init__(cfg, cluster)
        self.caches: list[PrefixLRU] | list[RadixNodeLRU]
        if cfg.radix_nodes:
            chunk = cfg.chunked_prefill_tokens // cfg.segment_size
            self.caches = [RadixNodeLRU(cfg.capacity_blocks, chunk) for _ in range(cfg.instances)]
        else:
            self.caches = [PrefixLRU(cfg.capacity_blocks) for _ in range(cfg.instances)]
        self._locks: list[list[tuple[float, int, int, Sequence[int]]]] = [
            [] for _ in range(cfg.instances)]
        """Per instance, a heap of (time, 0 lock / 1 release, seq, keys): a running
        request's prefix locked at its start and released at its end (``RadixNodeLRU``)."""
        self._held: dict[int, Optional[Node]] = {}  # lock seq -> RadixNodeLRU.lock's handle
        self._seq = itertools.count()

    def route(self, req: Request, now: float) -> int:
        i = self._rr % len(self.caches)
        self._rr += 1
        return i

    def serve(self, req: Request, now: float) -> Outcome:
        i = self.route(req, now)
        if self.cfg.match_at_admission:  # the cache as it will be when the request starts
            x = self.cluster.instances[i]
            self._advance(i, x.free_at if x.free_at > now else now)
        full = self.full(req)
        cache = self.caches[i]
        hit = cache.match(full)
        cache.use(full)
        return Outcome(i, hit * self.seg, {}, {}, 0.0, self.held(req, full, cache))

    def admitted(self, req: Request, out: Outcome, start: float, end: float) -> None:
        if not self.cfg.radix_nodes:
            return
        seq, locks = next(self._seq), self._locks[out.worker]
        heapq.heappush(locks, (start, 0, seq, self.full(req)))
        heapq.heappush(locks, (max(start, end), 1, seq, ()))

    def advance(self, now: float) -> None:
        if not self.cfg.match_at_admission:
            super().advance(now)
            return
        for i in range(len(self.caches)):
            self._advance(i, now)

    def pressure(self, running: Mapping[int, int], now: float) -> None:
        for i, (cache, locks) in enumerate(zip(self.caches, self._locks)):
            released = False
            while locks and locks[0][0] <= now:  # running prefixes locked and released by now
                released |= self._lock_event(i)
            if i in running:
                cache.capacity = self.room(running[i])
            if released or i in running:
                cache.overflow()

    def _lock_event(self, i: int) -> bool:
        """Apply instance ``i``'s next lock event; True if it released a prefix."""
        _, release, seq, keys = heapq.heappop(self._locks[i])
        if release:
            self.caches[i].unlock(self._held.pop(seq))
        else:
            self._held[seq] = self.caches[i].lock(keys)
        return bool(release)

    def _advance(self, i: int, t: float) -> None:
        """Instance ``i``'s cache at ``t``, event by event as SGLang sees them, which may
        lie ahead of the other instances' clocks: the cache shrinks at every allocation;
        a starting request locks its prefix before its KV is allocated, and an ending one
        frees its KV before its prefix is unlocked (at one moment: KV freed, prefixes
        locked, KV allocated, prefixes unlocked)."""
        cluster, locks, cache = self.cluster, self._locks[i], self.caches[i]
        while True:
            tk, freed = cluster.kv_next(i)
            kv = (tk, 0 if freed else 2)
            lk = (locks[0][0], 1 + 2 * locks[0][1]) if locks else (math.inf, 0)
            if min(kv, lk)[0] > t:
                return
            if lk < kv:
                self._lock_event(i)
            else:
                cache.capacity = self.room(cluster.kv_step(i))
            cache.overflow()


def route_cache_aware(router: CacheAwareRouter, req: Request, cfg: SimConfig, cluster: Cluster,
                      now: float) -> str:
    """The worker ``router`` picks for ``req``: its text is the request's blocks, each as
    long in characters as its tokens (``cfg.chars_per_token``); loads are in-flight requests."""
    seg, n = cfg.segment_size, len(req.keys)
    tail = req.input_tokens - seg * (n - 1)
    lengths = [round(seg * cfg.chars_per_token)] * (n - 1) + [round(tail * cfg.chars_per_token)] if n else []
    loads = dict(zip(cluster.ids, cluster.inflights(now)))
    return router.select(req.keys, loads, lengths, now).worker


def proxy_pick(balancer: Balancer, req: Request, cluster: Cluster, now: float, seg: int) -> int:
    """The harness proxy's pick (``balancer``, its ``Balancer``) on the requests in flight
    now; a request's prefix is the key of its block that ends at ``AFFINITY_TOKENS``."""
    balancer.inflight = cluster.inflights(now)
    if not req.keys:
        return balancer.pick()
    return balancer.pick(req.keys[min(len(req.keys), max(1, AFFINITY_TOKENS // seg)) - 1])


class StockBounded(Stock):
    name = "stock_bounded"

    def __init__(self, cfg: SimConfig, cluster: Cluster) -> None:
        super().__init__(cfg, cluster)
        self.balancer = Balancer(cfg.instances, "bounded_load", cfg.load_factor)

    def route(self, req: Request, now: float) -> int:
        return proxy_pick(self.balancer, req, self.cluster, now, self.seg)

    def stats(self) -> dict:
        return {"overflows": self.balancer.overflows}


class CacheAware(Stock):
    name = "cache_aware"

    def __init__(self, cfg: SimConfig, cluster: Cluster) -> None:
        super().__init__(cfg, cluster)
        self.router = CacheAwareRouter(cluster.ids, self.router_config())
        self.index = {w: i for i, w in enumerate(cluster.ids)}

    def router_config(self) -> CacheAwareConfig:
        return self.cfg.router

    def route(self, req: Request, now: float) -> int:
        return self.index[route_cache_aware(self.router, req, self.cfg, self.cluster, now)]

    def stats(self) -> dict:
        d = self.router.decisions
        total = max(sum(d.values()), 1)
        return {"router_decisions": {k: round(v / total, 4) for k, v in d.items()}}


class CacheAwareV019(CacheAware):
    name = "cache_aware_v019"

    def router_config(self) -> CacheAwareConfig:
        return CacheAwareConfig.v019()


class Limit(Policy):
    name = "limit"

    def __init__(self, cfg: SimConfig, cluster: Cluster) -> None:
        super().__init__(cfg, cluster)
        self.cache = new_cache(cfg.capacity_blocks * cfg.instances, cfg.policy)

    def serve(self, req: Request, now: float) -> Outcome:
        full = self.full(req)
        hit = self.cache.match(full)
        self.cache.use(full)
        return Outcome(self.least_loaded(now), hit * self.seg, {}, {}, 0.0,
                       self.held(req, full, self.cache))

    def pressure(self, running: Mapping[int, int], now: float) -> None:
        self.cache.capacity = self.room(sum(self.cluster.running_kv), self.cfg.instances)
        self.cache.overflow()


class Mooncake(Limit):
    name = "mooncake"

    def serve(self, req: Request, now: float) -> Outcome:
        full = self.full(req)
        hit = self.cache.match(full)
        self.cache.use(full)
        shape = self.cfg.shape
        pull = shape.kv_bytes(hit * self.seg)
        put = shape.kv_bytes((len(full) - hit) * self.seg)
        moved = {"pull_kv": pull, "put": put}
        return Outcome(self.least_loaded(now), hit * self.seg, {}, moved,
                       pull / self.cfg.bandwidth_Bps, self.held(req, full, self.cache))


BASELINES: dict[str, type[Policy]] = {
    p.name: p for p in (Stock, CacheAware, CacheAwareV019, Mooncake, Limit, StockBounded)}
