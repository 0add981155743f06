"""The simulation loop: requests in arrival order through one policy on one cluster.

Per request, at its arrival ``now``: the running requests' KV holds that began or
ended by ``now`` resize the caches (``SimConfig.memory_pressure``, ``Policy.advance``); the policy picks
the executor and serves the cached prefix (``Policy.serve``); with
``SimConfig.prefill_visibility`` the hit is cut at the first block whose prefill is
still running when the request starts (``Prefills``); the cluster queues the work and
the request's KV hold (``Cluster.run``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from sglang_tokenlake.sim.cluster import Cluster
from sglang_tokenlake.sim.compute import ComputeModel
from sglang_tokenlake.sim.model import Outcome, SimConfig
from sglang_tokenlake.sim.policies import BASELINES, Policy
from sglang_tokenlake.sim.tokenlake import TokenLake
from sglang_tokenlake.sim.workloads import Request, Workload

POLICIES = ("stock", "cache_aware", "cache_aware_v019", "mooncake", "tokenlake", "limit")
"""The online policies, in report order (``simulate`` also knows ``stock_bounded``, stock
workers behind the harness's bounded-load proxy, and ``belady``, the offline bound)."""
ALL_POLICIES = POLICIES + ("stock_bounded", "belady")


def make_policy(name: str, cfg: SimConfig, cluster: Cluster) -> Policy:
    """The policy ``name`` (one of ``ALL_POLICIES``) on ``cluster``."""
    if name == "tokenlake":
        return TokenLake(cfg, cluster)
    if name == "belady":
        from sglang_tokenlake.sim.belady import Belady
        return Belady(cfg, cluster)
    if name not in BASELINES:
        raise ValueError(f"unknown policy {name!r}; choose from {ALL_POLICIES}")
    return BASELINES[name](cfg, cluster)


@dataclass
class RunResult:
    policy: str
    instances: int
    capacity_blocks: int
    requests: int = 0
    input_tokens: int = 0
    hit_tokens: int = 0
    bytes: dict[str, int] = field(default_factory=dict)
    busy_s: list[float] = field(default_factory=list)
    remote_s: list[float] = field(default_factory=list)
    served: list[int] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)
    """Hit tokens of each request, in the workload's order."""
    executors: list[int] = field(default_factory=list)
    """The instance each request ran on, in the workload's order."""
    makespan_s: float = 0.0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def load_cv(self) -> float:
        """Coefficient of variation of per-instance GPU seconds (population std / mean)."""
        xs = self.busy_s
        m = sum(xs) / len(xs) if xs else 0.0
        if m <= 0:
            return 0.0
        return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) / m

    def summary(self) -> dict[str, Any]:
        def pct(xs: list[float], q: float) -> float:
            if not xs:
                return 0.0
            s = sorted(xs)
            return s[min(len(s) - 1, int(q * len(s)))]

        return {
            "policy": self.policy,
            "instances": self.instances,
            "capacity_blocks_per_instance": self.capacity_blocks,
            "requests": self.requests,
            "token_hit_rate": round(self.hit_rate, 5),
            "load_cv": round(self.load_cv, 5),
            "busy_s_per_instance": [round(x, 2) for x in self.busy_s],
            "remote_s_per_instance": [round(x, 2) for x in self.remote_s],
            "requests_per_instance": self.served,
            "ttft_p50_s": round(pct(self.ttft, 0.5), 4),
            "ttft_p90_s": round(pct(self.ttft, 0.9), 4),
            "ttft_p99_s": round(pct(self.ttft, 0.99), 4),
            "queue_wait_mean_s": round(sum(self.wait) / max(len(self.wait), 1), 4),
            "bytes": dict(sorted(self.bytes.items())),
            "makespan_s": round(self.makespan_s, 2),
            "wall_s": round(self.wall_s, 2),
            **self.extra,
        }


def time_stretch(workload: Workload, instances: int, compute: ComputeModel,
                 target_util: float, nominal_batch: int = 16) -> float:
    """Arrival-time multiplier that makes the uncached GPU work ``target_util`` of the cluster's.

    Work per request without any cache: prefill of the whole prompt plus its decode
    share at ``nominal_batch``. ``rate_scale = 1 / stretch``.
    """
    work = sum(compute.prefill_s(r.input_tokens, 0)
               + compute.decode_work_s(r.output_tokens, r.input_tokens, nominal_batch)
               for r in workload.requests)
    span = max(workload.duration_s(), 1e-9)
    return work / (target_util * instances * span)


class Prefills:
    """Blocks whose prefill is still running (``SimConfig.prefill_visibility``): the time
    each becomes usable, per scope (the executing instance for per-instance caches, -1
    for pooled ones)."""

    def __init__(self) -> None:
        self.ready_at: dict[tuple[int, int], float] = {}
        self.cut = 0  # requests whose hit an unfinished prefill shortened
        self._seen = 0

    def usable(self, scope: int, keys: Sequence[int], hit: int, start: float) -> int:
        """How many of the first ``hit`` blocks of ``keys`` are usable at ``start``."""
        ready = self.ready_at
        for j in range(hit):
            t = ready.get((scope, keys[j]))
            if t is not None and t > start:
                self.cut += 1
                return j
        return hit

    def computed(self, scope: int, keys: Sequence[int], now: float, at: float) -> None:
        """A request admitted at ``now`` computes ``keys``; its prefill ends at ``at``."""
        ready = self.ready_at
        for k in keys:
            t = ready.get((scope, k))
            if t is None or t <= now or at < t:  # absent, stale (evicted since) or later
                ready[(scope, k)] = at
        self._seen += 1
        if self._seen % 4096 == 0:  # forget blocks long usable
            self.ready_at = {k: t for k, t in ready.items() if t > now}


def _shorten(out: Outcome, usable: int, hit: int, seg: int) -> Outcome:
    """``out`` with only its first ``usable`` of ``hit`` cached blocks served: the rest
    is computed again and held by the executor while the request runs. Shipped tokens,
    pulled bytes and transfer time shrink in proportion."""
    f = usable / hit
    moved = dict(out.bytes)
    if "pull_kv" in moved:
        moved["pull_kv"] = int(moved["pull_kv"] * f)
    shipped = {o: int(t * f) // seg * seg for o, t in out.shipped.items()}
    return out._replace(hit_tokens=usable * seg, shipped={o: t for o, t in shipped.items() if t},
                        bytes=moved, transfer_s=out.transfer_s * f,
                        held_tokens=out.held_tokens + (hit - usable) * seg)


def simulate(workload: Workload, policy_name: str, cfg: SimConfig,
             progress: Optional[Callable[[int], None]] = None) -> RunResult:
    """Run ``workload`` through policy ``policy_name`` (one of ``POLICIES``)."""
    t0 = time.perf_counter()
    cluster = Cluster(cfg.instances, cfg.compute)
    policy = make_policy(policy_name, cfg, cluster)
    res = RunResult(policy_name, cfg.instances, cfg.capacity_blocks)
    prepare = getattr(policy, "prepare", None)
    if prepare is not None:  # an offline policy learns the future
        prepare(workload.requests)
    bytes_ = res.bytes
    prefills = Prefills() if cfg.prefill_visibility else None
    first = workload.requests[0].arrival_s if workload.requests else 0.0
    for n, req in enumerate(workload.requests):
        now = (req.arrival_s - first) * cfg.time_stretch
        if cfg.memory_pressure:
            policy.advance(now)
        out = policy.serve(req, now)
        if prefills is None:
            _account(cluster, policy, cfg, req, now, out, res)
        else:
            scope = -1 if policy.pooled else out.worker
            full = policy.full(req)
            hit = min(out.hit_tokens // cfg.segment_size, len(full))
            start = max(now, cluster.instances[out.worker].free_at)
            usable = prefills.usable(scope, full, hit, start)
            if usable < hit:
                out = _shorten(out, usable, hit, cfg.segment_size)
            ttft = _account(cluster, policy, cfg, req, now, out, res)
            prefills.computed(scope, full[usable:], now, now + ttft)
        for kind, b in out.bytes.items():
            bytes_[kind] = bytes_.get(kind, 0) + b
        if progress is not None and n % 512 == 511:
            progress(512)
    if progress is not None:
        progress(len(workload.requests) % 512)
    res.busy_s = [x.busy_s for x in cluster.instances]
    res.remote_s = [x.remote_s for x in cluster.instances]
    res.served = [x.served for x in cluster.instances]
    res.makespan_s = max((x.free_at for x in cluster.instances), default=0.0)
    res.extra.update(policy.stats())
    if prefills is not None:
        res.extra["hits_cut_by_running_prefill"] = prefills.cut
    res.wall_s = time.perf_counter() - t0
    return res


def _account(cluster: Cluster, policy: Policy, cfg: SimConfig, req: Request, now: float,
             out: Outcome, res: RunResult) -> float:
    """Queue ``req`` as ``out`` decided; return its time to first token."""
    shipped = sum(out.shipped.values())
    adm = cluster.run(
        out.worker, now,
        new_tokens=req.input_tokens - out.hit_tokens,
        local_ctx=out.hit_tokens - shipped,
        decode_ctx=req.input_tokens - shipped,
        output_tokens=req.output_tokens,
        transfer_s=out.transfer_s,
        kv_tokens=(0 if not cfg.memory_pressure else req.output_tokens
                   + (out.held_tokens if cfg.shared_prefix_kv else req.input_tokens)),
    )
    policy.admitted(req, out, adm.start, adm.end)
    new = req.input_tokens - out.hit_tokens
    for owner, tokens in out.shipped.items():
        cluster.charge(owner, now, cfg.compute.remote_attn_s(new, req.output_tokens, tokens))
    res.requests += 1
    res.input_tokens += req.input_tokens
    res.hit_tokens += out.hit_tokens
    res.hits.append(out.hit_tokens)
    res.executors.append(out.worker)
    res.ttft.append(adm.ttft)
    res.wait.append(adm.wait)
    return adm.ttft
