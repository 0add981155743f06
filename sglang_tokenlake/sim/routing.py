"""The sglang-router ``cache_aware`` policy as a plain-Python baseline (not TokenLake's routing).

What the router (sgl-router, policies/cache_aware.rs and policies/tree.rs; the
``sglang-router`` 0.3.2 wheel) does for each request::

    loads = in-flight requests per worker (counted by the router: routed, not finished)
    if max(loads) - min(loads) > balance_abs_threshold
       and max(loads) > min(loads) * balance_rel_threshold:
        worker = the first worker with the smallest load        # "imbalanced"
    else:
        matched, tenant = tree.prefix_match(text)
        if matched / len(text) > cache_threshold:
            worker = tenant                                       # "cache_hit"
        else:
            worker = the first worker with the smallest load      # "least_loaded"
    tree.insert(text, worker)

The weak-match fallback is the least loaded worker since upstream PR #14650
(Dec 2025; the module's doc comment still says "smallest tree"). Up to 0.1.9, the
era of the TokenLake paper, it was the worker whose tree holds the fewest
characters, with thresholds 0.5 / 32 / 1.0001: ``CacheAwareConfig.v019()``.
"First worker with the smallest load" is worker order, as Rust's ``min_by_key``.

The tree is the router's own approximate radix tree over request *text* (never
the workers' caches), shared by all workers (*tenants*): each node records which
tenants inserted a string through it and when. ``prefix_match`` walks as far as
the text matches, returns the matched length and one tenant of the deepest
matched node, and refreshes that tenant's access time along the path. Every
``eviction_interval`` seconds each tenant whose character count exceeds
``max_tree_size`` loses its least recently used leaves until it fits.

Defaults are those ``python -m sglang_router.launch_router`` 0.3.2 actually uses
(``RouterArgs``: cache_threshold 0.3, balance_abs_threshold 64,
balance_rel_threshold 1.5, eviction_interval_secs 60, max_tree_size 2**26).

Simplifications (documented in docs/simulator.md):
- The tree is uncompressed: one node per *unit*. Units are characters for text
  (exact radix semantics: a radix node is only ever split where some tenant's
  string diverges or ends, so the deepest matched unit has the same tenants as
  the deepest radix node) or whole token blocks with a length (the simulator).
- The tenant of a node with several tenants is the earliest to have reached it
  (the Rust tree takes the first key of a DashMap: an arbitrary but fixed order).
- Access times are a logical clock (the order of operations), not milliseconds.

Plain Python: no torch, sglang or zmq.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Optional

ROOT = 0


@dataclass(frozen=True)
class CacheAwareConfig:
    """``sglang_router.launch_router --policy cache_aware`` settings (0.3.2 defaults)."""

    cache_threshold: float = 0.3
    """Route to the best-matching worker when matched/total > this."""
    balance_abs_threshold: int = 64
    """Imbalanced when max - min load > this (and the relative test holds)."""
    balance_rel_threshold: float = 1.5
    """Imbalanced when max load > min load * this (and the absolute test holds)."""
    eviction_interval_s: float = 60.0
    """Seconds between tree evictions."""
    max_tree_size: int = 2**26
    """Characters each tenant may keep in the tree after an eviction."""
    fallback: Literal["least_loaded", "smallest_tree"] = "least_loaded"
    """Where a balanced request whose match is at most ``cache_threshold`` goes: the
    least loaded worker (0.3.2) or the worker with the smallest tree (<= 0.1.9)."""

    def __post_init__(self) -> None:
        if self.fallback not in ("least_loaded", "smallest_tree"):
            raise ValueError(f"fallback must be least_loaded or smallest_tree, got {self.fallback!r}")

    @classmethod
    def v019(cls) -> CacheAwareConfig:
        """The rule of sglang-router <= 0.1.9 (the TokenLake paper's baseline): thresholds
        0.5 / 32 / 1.0001, trees of 2**24 characters, smallest-tree fallback."""
        return cls(cache_threshold=0.5, balance_abs_threshold=32, balance_rel_threshold=1.0001,
                   max_tree_size=2**24, fallback="smallest_tree")

    @classmethod
    def pool(cls) -> CacheAwareConfig:
        """The rule in front of a TokenLake pool: 0.3.2's, balanced as soon as the busiest
        worker has more than 2 requests in flight above the least loaded one. A detour
        keeps its hit in the pool, so locality need not be paid for with the skew that
        the defaults (64 requests) allow a per-worker cache."""
        return cls(balance_abs_threshold=2, balance_rel_threshold=1.0)

    def with_flags(self, flags: Sequence[str]) -> CacheAwareConfig:
        """This config with the thresholds that ``sglang_router.launch_router`` ``flags``
        set (``--flag VALUE`` or ``--flag=VALUE``; the last one wins, as in the router);
        other flags are ignored."""
        fields = {"--cache-threshold": ("cache_threshold", float),
                  "--balance-abs-threshold": ("balance_abs_threshold", int),
                  "--balance-rel-threshold": ("balance_rel_threshold", float)}
        got: dict[str, float] = {}
        flags = [str(f) for f in flags]
        for i, f in enumerate(flags):
            name, eq, value = f.partition("=")
            if name not in fields:
                continue
            if not eq:
                if i + 1 >= len(flags):
                    raise ValueError(f"router flag {name} has no value")
                value = flags[i + 1]
            attr, kind = fields[name]
            try:
                got[attr] = kind(value)
            except ValueError:
                raise ValueError(f"router flag {name}: {value!r} is not a number") from None
        return replace(self, **got)

    def threshold_flags(self) -> tuple[str, ...]:
        """This config's thresholds as ``sglang_router.launch_router`` flags."""
        return ("--cache-threshold", f"{self.cache_threshold:g}",
                "--balance-abs-threshold", str(self.balance_abs_threshold),
                "--balance-rel-threshold", f"{self.balance_rel_threshold:g}")


class _Node:
    __slots__ = ("parent", "length", "children", "tenants")

    def __init__(self, parent: int, length: int) -> None:
        self.parent = parent
        self.length = length
        self.children: dict[Hashable, int] = {}
        self.tenants: dict[str, None] = {}  # insertion order = tie order


class ApproxTree:
    """A multi-tenant prefix tree over units with lengths (chars, or token blocks)."""

    def __init__(self) -> None:
        self._nodes: dict[int, _Node] = {ROOT: _Node(ROOT, 0)}
        self._next = 1
        self._lru: dict[str, OrderedDict[int, None]] = {}  # tenant -> nodes, oldest first
        self.size: dict[str, int] = {}  # tenant -> characters (units' lengths) held

    def add_tenant(self, tenant: str) -> None:
        self._lru.setdefault(tenant, OrderedDict())
        self.size.setdefault(tenant, 0)

    def remove_tenant(self, tenant: str) -> None:
        for nid in self._lru.pop(tenant, {}):
            self._detach(nid, tenant)
        self.size.pop(tenant, None)

    def _touch(self, path: list[int], tenant: str) -> None:
        # Deepest first, so a node is never older than its descendants: the oldest
        # entry of a tenant is always one of its leaves.
        lru = self._lru[tenant]
        for nid in reversed(path):
            lru[nid] = None
            lru.move_to_end(nid)

    def insert(self, units: Sequence[Hashable], tenant: str,
               lengths: Optional[Sequence[int]] = None) -> None:
        """Record that ``units`` (with ``lengths``, default 1 each) were routed to ``tenant``."""
        self.add_tenant(tenant)
        nid, path = ROOT, []
        for i, u in enumerate(units):
            node = self._nodes[nid]
            child = node.children.get(u)
            if child is None:
                child = self._next
                self._next += 1
                self._nodes[child] = _Node(nid, 1 if lengths is None else lengths[i])
                node.children[u] = child
            c = self._nodes[child]
            if tenant not in c.tenants:
                c.tenants[tenant] = None
                self.size[tenant] += c.length
            path.append(child)
            nid = child
        self._touch(path, tenant)

    def prefix_match(self, units: Sequence[Hashable],
                     lengths: Optional[Sequence[int]] = None) -> tuple[int, Optional[str]]:
        """``(matched length, tenant of the deepest matched node)``; refreshes that tenant's path."""
        nid, matched, path = ROOT, 0, []
        for i, u in enumerate(units):
            child = self._nodes[nid].children.get(u)
            if child is None:
                break
            matched += 1 if lengths is None else lengths[i]
            path.append(child)
            nid = child
        if not path:
            return 0, None
        tenant = next(iter(self._nodes[nid].tenants))
        self._touch(path, tenant)
        return matched, tenant

    def smallest_tenant(self, order: Sequence[str]) -> str:
        """The tenant holding the fewest characters (ties: earliest in ``order``)."""
        return min(order, key=lambda t: self.size.get(t, 0))

    def evict_tenant_by_size(self, max_size: int) -> None:
        """Drop each tenant's least recently used leaves until it holds <= ``max_size``."""
        for tenant, lru in self._lru.items():
            while self.size[tenant] > max_size and lru:
                nid, _ = lru.popitem(last=False)
                self._detach(nid, tenant)

    def _detach(self, nid: int, tenant: str) -> None:
        node = self._nodes[nid]
        if tenant in node.tenants:
            del node.tenants[tenant]
            self.size[tenant] -= node.length
        while not node.tenants and not node.children and nid != ROOT:
            parent = self._nodes[node.parent]
            for u, c in parent.children.items():
                if c == nid:
                    del parent.children[u]
                    break
            del self._nodes[nid]
            nid, node = node.parent, parent

    def __len__(self) -> int:
        return len(self._nodes) - 1


class Decision(NamedTuple):
    worker: str
    reason: str
    """``"imbalanced"``, ``"cache_hit"``, or the fallback: ``"least_loaded"`` / ``"smallest_tree"``."""
    match_rate: float


class CacheAwareRouter:
    """sglang-router's ``cache_aware`` decision for a fixed list of workers (0.3.2 by
    default; ``CacheAwareConfig.v019()`` for the paper-era rule).

    ``loads`` (in-flight requests per worker) come from the caller: the router
    counts a request from routing until its response ends.
    """

    def __init__(self, workers: Sequence[str], config: CacheAwareConfig = CacheAwareConfig()):
        self.workers = list(workers)
        self.config = config
        self.tree = ApproxTree()
        for w in self.workers:
            self.tree.add_tenant(w)
        self._last_eviction = 0.0
        self.decisions: dict[str, int] = {"imbalanced": 0, "cache_hit": 0, config.fallback: 0}

    def select(self, units: Sequence[Hashable], loads: Mapping[str, int],
               lengths: Optional[Sequence[int]] = None, now: float = 0.0) -> Decision:
        """Pick the worker for a request whose text is ``units`` and insert it into the tree."""
        self.maybe_evict(now)
        cfg = self.config
        ls = [loads.get(w, 0) for w in self.workers]
        hi, lo = max(ls), min(ls)
        least = self.workers[ls.index(lo)]  # the first with the minimum, as min_by_key
        if hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold:
            self.tree.insert(units, least, lengths)
            return self._count(Decision(least, "imbalanced", 0.0))
        total = len(units) if lengths is None else sum(lengths)
        matched, tenant = self.tree.prefix_match(units, lengths)
        rate = matched / total if total else 0.0
        if rate > cfg.cache_threshold and tenant in self.tree.size:
            d = Decision(tenant, "cache_hit", rate)
        elif cfg.fallback == "least_loaded":
            d = Decision(least, "least_loaded", rate)
        else:
            d = Decision(self.tree.smallest_tenant(self.workers), "smallest_tree", rate)
        self.tree.insert(units, d.worker, lengths)
        return self._count(d)

    def _count(self, d: Decision) -> Decision:
        self.decisions[d.reason] += 1
        return d

    def maybe_evict(self, now: float) -> None:
        """Run the periodic eviction if ``eviction_interval_s`` has passed since the last one."""
        if now - self._last_eviction >= self.config.eviction_interval_s:
            self._last_eviction = now
            self.tree.evict_tenant_by_size(self.config.max_tree_size)


class RoundRobinRouter:
    """Stock ``round_robin``: workers in turn."""

    def __init__(self, workers: Sequence[str]) -> None:
        self.workers = list(workers)
        self._i = 0

    def select(self) -> str:
        w = self.workers[self._i % len(self.workers)]
        self._i += 1
        return w
