"""What the simulator's parts exchange: the cluster's configuration and a policy's decision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from sglang_tokenlake.bench.proxy import LOAD_FACTOR
from sglang_tokenlake.dispatch import Costs, ModelShape
from sglang_tokenlake.policy import PolicyConfig
from sglang_tokenlake.sim.compute import ComputeModel
from sglang_tokenlake.sim.routing import CacheAwareConfig


class Outcome(NamedTuple):
    """What a policy decided for one request."""

    worker: int
    """Index of the executing instance."""
    hit_tokens: int
    """Prompt tokens served from cache (any mode but recompute)."""
    shipped: dict[int, int]
    """Owner index -> cached tokens whose attention that owner computes (SHIP_QUERY)."""
    bytes: dict[str, int]
    """Bytes moved for this request, by kind (``pull_kv``, ``ship_query``, ``put``...)."""
    transfer_s: float
    """Seconds until pulled KV has arrived at the executor."""
    held_tokens: int = 0
    """Prompt KV tokens the executor holds outside its cache while the request runs
    (pulled or computed KV no cache of it keeps, the partial last block); the part of
    the prompt its cache holds is shared with the cache, as SGLang's locked prefix."""


EXECUTORS = ("least_loaded", "round_robin", "power_of_two", "cache_aware", "least_inflight",
             "bounded_load")
"""How TokenLake's front end picks a request's worker (``SimConfig.tokenlake_executor``)."""


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster."""

    instances: int
    capacity_blocks: int
    """KV memory of each instance for the cache, in segments (running requests' KV
    comes out of it with ``memory_pressure``)."""
    segment_size: int
    """Tokens per segment (block) of the workload."""
    time_stretch: float = 1.0
    """Arrival times are multiplied by this (``1 / rate_scale``)."""
    compute: ComputeModel = ComputeModel()
    shape: ModelShape = ModelShape()
    bandwidth_Bps: float = 25e9
    router: CacheAwareConfig = CacheAwareConfig()
    """The ``cache_aware`` policy's router settings (``cache_aware_v019`` uses
    ``CacheAwareConfig.v019()``)."""
    chars_per_token: float = 4.0
    """Router tree sizes are characters; a token counts this many."""
    policy: PolicyConfig = PolicyConfig()
    """TokenLake: placement, replicas, leaf-first eviction (the live pool's record)."""
    memory_pressure: bool = True
    """Running requests' KV (prompt + output tokens) occupies their instance's KV memory
    from start to last token, shrinking what its cache may hold (SGLang's cache and
    running requests share one pool); the pooled caches of ``limit``/``mooncake`` lose
    the sum over instances. False: caches always hold ``capacity_blocks``."""
    tokenlake_executor: str = "least_loaded"
    """TokenLake: how the front end picks a request's worker: ``least_loaded`` (least
    queued work, ties to the one holding most of its prefix), ``round_robin``,
    ``power_of_two`` (sglang-router's: of two random workers, the one with fewer
    requests in flight; ties to the first) or ``cache_aware`` (sglang-router's rule
    with ``tokenlake_router``'s thresholds) or ``least_inflight`` (the harness's least-load
    proxy: fewest requests in flight, ties to the worker that last served the same first
    64 tokens, else the next after the last pick) or ``bounded_load`` (the proxy's
    bounded-load prefix homes, ``bench.proxy.Balancer``)."""
    tokenlake_router: CacheAwareConfig = CacheAwareConfig.pool()
    """The ``cache_aware`` executor's router settings."""
    load_factor: float = LOAD_FACTOR
    """The ``bounded_load`` executor's (and ``stock_bounded``'s) bound: the proxy's
    ``--load-factor``."""
    shared_prefix_kv: bool = False
    """With ``memory_pressure``: count only the prompt KV a running request holds outside
    its executor's cache (``Outcome.held_tokens``; SGLang's running requests share their
    cached prefix with the tree) instead of the whole prompt. TokenLake then pays for
    the pulled and recomputed segments its executors hold beside their homes' copies."""
    prefill_visibility: bool = False
    """A block a request computes becomes usable by other requests only once that
    request's prefill has finished (SGLang inserts a prefix into its tree after the
    prefill; the pool indexes it then), and a request's hit is decided when it starts
    rather than when it arrives. Requests that meet an unfinished prefill of the same
    prefix compute it again and hold that copy while they run. Per instance for the
    per-instance caches, pool-wide for the pooled ones (``Policy.pooled``)."""

    radix_nodes: bool = False
    """The per-instance caches (``stock``, ``cache_aware``) as SGLang's radix tree
    (``sim/radix.py``): a node is evicted whole, leaves first, least recently used
    first, and a running request's prefix is locked from its start to its last token.
    False: they evict single blocks (``PrefixLRU``), which keeps the first blocks of a
    squeezed context. The live replay (``sim.live``) sets it; the simulator's own
    tables keep the block model."""
    chunked_prefill_tokens: int = 4096
    """With ``radix_nodes``: SGLang's ``--chunked-prefill-size`` (it inserts a prompt
    into its tree after each chunk, so a node ends there); 0: no chunking. Rounded down
    to whole blocks."""

    match_at_admission: bool = False
    """With ``radix_nodes``: a stock worker matches a request's prompt against its cache as
    the cache will be when the request starts (its queue worked off: the running prefixes
    locked and released and the running KV held by then), as SGLang does at admission,
    instead of when it arrives and is routed."""

    spill_window_s: float = 0.5
    """TokenLake with ``policy.spill_margin``: each member receives at most ``SPILL_SHARE``
    of its capacity in spilled segments per this many seconds (the live pool's
    ``--tokenlake-heartbeat-interval``)."""

    def __post_init__(self) -> None:
        if not self.load_factor >= 1.0:
            raise ValueError(f"load_factor must be >= 1, got {self.load_factor!r}")
        if self.tokenlake_executor not in EXECUTORS:
            raise ValueError(f"tokenlake_executor must be one of {', '.join(EXECUTORS)}, "
                             f"got {self.tokenlake_executor!r}")
        if self.radix_nodes and not (self.memory_pressure and self.shared_prefix_kv):
            raise ValueError("radix_nodes needs memory_pressure and shared_prefix_kv (a running "
                             "request's locked prefix is its KV, counted once)")
        if self.match_at_admission and not self.radix_nodes:
            raise ValueError("match_at_admission needs radix_nodes")
        if self.chunked_prefill_tokens < 0:
            raise ValueError(f"chunked_prefill_tokens must be >= 0, got {self.chunked_prefill_tokens}")
        if not self.spill_window_s > 0:
            raise ValueError(f"spill_window_s must be > 0, got {self.spill_window_s}")

    @property
    def costs(self) -> Costs:
        c = self.compute
        return Costs(self.bandwidth_Bps, c.prefill_s_per_token, c.attn_s_per_token_pair)
