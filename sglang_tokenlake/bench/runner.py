"""Run one configuration: fresh workers + front end, warm-up, calibration, replay, counters.

Every process started here is registered in ``LIVE`` and stopped in a ``finally``
(Ctrl-C and errors included); ``stop_all()`` is also the harness's signal/atexit
hook. Workers of one configuration are stopped before the next one starts.
With ``ClusterSettings.cpu_quota`` every worker's process tree runs inside its own
CPU budget (``cpuquota``): the cgroup is created before the worker starts, its quota
applied once the workers are ready (before warm-up, calibration and the replay), and
it is removed after the worker stopped; the front end and the load generator stay
outside.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import requests

from sglang_tokenlake.bench import counters, cpuquota
from sglang_tokenlake.bench.frontends import Frontend
from sglang_tokenlake.bench.load import RequestRecord, run_one, run_replay
from sglang_tokenlake.bench.proxy import LOAD_FACTOR
from sglang_tokenlake.bench.workloads import BenchWorkload
from sglang_tokenlake.cluster import PoolSpec, Worker, WorkerSpec, start_workers, wait_pool
from sglang_tokenlake.request_log import read as read_request_log
from sglang_tokenlake.sim.routing import CacheAwareConfig


@dataclass(frozen=True)
class Config:
    name: str
    backend: str
    """``radix`` (stock SGLang) or ``tokenlake``."""
    frontend: str
    """A key of ``frontends.FRONTENDS``."""
    frontend_args: tuple[str, ...] = ()
    """Front-end flags of this configuration (before ``--router-args``, which can override them)."""


CONFIGS: dict[str, Config] = {
    "stock-rr": Config("stock-rr", "radix", "router-round_robin"),
    "stock-cache-aware": Config("stock-cache-aware", "radix", "router-cache_aware"),
    "tokenlake-rr": Config("tokenlake-rr", "tokenlake", "router-round_robin"),
    "tokenlake-p2c": Config("tokenlake-p2c", "tokenlake", "router-power_of_two"),
    # The router's cache-aware rule with a tight balance bound (CacheAwareConfig.pool).
    "tokenlake-cache-aware": Config("tokenlake-cache-aware", "tokenlake", "router-cache_aware",
                                    frontend_args=CacheAwareConfig.pool().threshold_flags()),
    # sglang-router has no fewest-in-flight policy: the harness's proxy serves this one.
    "tokenlake-least-load": Config("tokenlake-least-load", "tokenlake", "proxy-least_load"),
    # Nor prefix homes with bounded loads: the proxy again, for both caches.
    "tokenlake-bounded": Config("tokenlake-bounded", "tokenlake", "proxy-bounded_load"),
    "stock-bounded": Config("stock-bounded", "radix", "proxy-bounded_load"),
}
DEFAULT_CONFIGS = ("stock-rr", "stock-cache-aware", "tokenlake-rr", "tokenlake-p2c",
                   "tokenlake-cache-aware", "tokenlake-least-load")
"""What ``--configs`` runs when not given (the bounded-load pair on request)."""


@dataclass
class BudgetedWorkerSpec(WorkerSpec):
    """A worker started through ``launcher`` (joins its CPU budget, then execs the server)."""

    launcher: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        return [*self.launcher, *super().argv()]


@dataclass
class ClusterSettings:
    """What every configuration's workers share (same capacity, page size, flags)."""

    model: str
    workers: int = 3
    page_size: int = 16
    segment_size: int = 64
    max_total_tokens: int = 12288
    dtype: str = "float32"
    device: Optional[str] = None
    extra_args: list[str] = field(default_factory=list)
    tokenlake_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    rr_frontend: str = "router"
    """``router`` (sglang-router --policy round_robin) or ``proxy`` (the harness's)."""
    load_factor: float = LOAD_FACTOR
    """The proxy's ``bounded_load`` bound (``--load-factor``)."""
    cpu_quota: Optional[float] = None
    """Cores of CPU time per worker (a cgroup quota per worker process tree); None: no budget."""
    cpu_quota_mechanism: str = ""
    """``cgroup-v1``, ``cgroup-v2`` or ``taskset`` (``cpuquota.detect``; filled in when empty)."""
    cpu_quota_root: str = ""
    startup_timeout: float = 300.0
    request_timeout: float = 600.0
    warmup_requests: int = 4
    calibration_requests: int = 3


@dataclass
class ConfigResult:
    config: str
    backend: str
    frontend: str
    workload: str
    rate: float
    records: list[RequestRecord]
    workers: list[dict[str, Any]]
    """Per worker: url and counter differences over the measured phase."""
    calibration: list[dict[str, float]]
    frontend_stats: Optional[dict[str, Any]]
    startup_s: float
    replay_s: float
    log_dir: str
    cpu: list[dict[str, Any]] = field(default_factory=list)
    """Per worker: its CPU budget and the cgroup's ``cpu.stat`` after the replay."""


class WorkerLost(RuntimeError):
    """A worker or front end stopped during a configuration without the harness asking
    (killed from outside, crashed); the configuration may be retried."""


class Sentinel:
    """Cheap liveness check of a configuration's processes while it is measured.

    A process that exited, or a worker whose log shows a SIGTERM the harness did not
    send (SGLang then drains and refuses new requests), ends the measurement.
    """

    def __init__(self, workers: Sequence[Worker], frontend: Optional[Frontend]) -> None:
        self.workers = list(workers)
        self.frontend = frontend
        self.offsets = {w.name: _size(w.log_path) for w in self.workers}

    def __call__(self) -> Optional[str]:
        for w in self.workers:
            if not w.alive():
                return f"{w.name} exited during the run; log tail:\n{w.log_tail()}"
            try:
                with open(w.log_path, "rb") as f:
                    f.seek(self.offsets[w.name])
                    new = f.read()
            except OSError:
                continue
            self.offsets[w.name] += len(new)
            if b"SIGTERM received" in new:
                return f"{w.name} received a SIGTERM from outside the harness; log tail:\n" \
                       f"{w.log_tail()}"
        fe = self.frontend
        if fe is not None and fe.proc is not None and fe.proc.poll() is not None:
            return f"front end {fe.kind} exited during the run; log tail:\n{fe.log_tail()}"
        return None


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


class _Live:
    """Everything with a ``stop()`` that is running now."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def add(self, x: Any) -> Any:
        self.items.append(x)
        return x

    def stop_all(self) -> None:
        while self.items:
            x = self.items.pop()
            try:
                x.stop()
            except Exception as e:  # keep stopping the others
                print(f"warning: stopping {x!r}: {e}", flush=True)


LIVE = _Live()


def stop_all() -> None:
    LIVE.stop_all()


def _frontend_kind(cfg: Config, s: ClusterSettings) -> str:
    if cfg.frontend == "router-round_robin" and s.rr_frontend == "proxy":
        return "proxy-round_robin"
    return cfg.frontend


def frontend_flags(cfg: Config, s: ClusterSettings, kind: str) -> list[str]:
    """The front end's extra flags: the configuration's own, then ``--router-args`` (a
    router only), so that a flag given there overrides the configuration's."""
    if kind == "proxy-bounded_load":
        return [*cfg.frontend_args, "--load-factor", repr(s.load_factor)]
    return [*cfg.frontend_args, *(s.router_args if kind.startswith("router") else [])]


def frontend_delta(before: Optional[dict[str, Any]],
                   after: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """What the proxy did in the measured phase (its ``/bench_stats`` after less before):
    requests sent to each worker, picks decided by a prefix's worker, prefixes given another
    home (``bounded_load``), and its settings; None behind the router."""
    if not before or not after:
        return None
    out: dict[str, Any] = {"policy": after.get("policy"),
                           "sent": [a - b for a, b in zip(after["sent"], before["sent"])]}
    for k in ("affinity_picks", "overflows"):
        if k in after:
            out[k] = after[k] - before.get(k, 0)
    if "load_factor" in after:
        out["load_factor"] = after["load_factor"]
    return out


def cpu_mechanism(s: ClusterSettings) -> cpuquota.Mechanism:
    """The CPU-budget mechanism of ``s`` (detected once, then kept in ``s``)."""
    if not s.cpu_quota_mechanism:
        m = cpuquota.detect()
        s.cpu_quota_mechanism, s.cpu_quota_root = m.kind, str(m.root or "")
        return m
    return cpuquota.Mechanism(s.cpu_quota_mechanism,
                              Path(s.cpu_quota_root) if s.cpu_quota_root else None)


def cpu_budgets(s: ClusterSettings, ports: Sequence[int]) -> list[cpuquota.CpuBudget]:
    """One budget per worker (none without ``cpu_quota``); named after this process and port."""
    if s.cpu_quota is None:
        return []
    return cpuquota.budgets(cpu_mechanism(s), s.cpu_quota,
                            [f"tokenlake-bench-{os.getpid()}-{p}" for p in ports])


def worker_specs(cfg: Config, s: ClusterSettings, log_env: Optional[dict[str, str]] = None,
                 budgets: Sequence[cpuquota.CpuBudget] = (), pool: Optional[PoolSpec] = None,
                 request_log: Optional[Path] = None) -> list[WorkerSpec]:
    """The workers of one configuration (on ``pool``'s ports, or free ones); with
    ``budgets`` (one per worker) each starts inside its own and gets threads to match;
    TokenLake workers log their requests to ``request_log`` (a file they share)."""
    pool = pool or PoolSpec.pick(s.workers)
    if budgets and len(budgets) != len(pool.ports):
        raise ValueError(f"{len(budgets)} CPU budgets for {len(pool.ports)} workers")
    args = ["--enable-metrics", *s.extra_args]
    if cfg.backend == "tokenlake":
        if request_log is not None:  # before the run's own flags, which may set another
            args += ["--tokenlake-request-log", str(request_log)]
        args += [*pool.peer_args(), *s.tokenlake_args]
    specs = []
    for i, p in enumerate(pool.ports):
        b = budgets[i] if budgets else None
        specs.append(BudgetedWorkerSpec(
            s.model, p, cfg.backend, page_size=s.page_size,
            segment_size=s.segment_size if cfg.backend == "tokenlake" else None,
            max_total_tokens=s.max_total_tokens, dtype=s.dtype, device=s.device,
            extra_args=list(args), env={**(b.env() if b else {}), **(log_env or {})},
            launcher=b.launcher() if b else []))
    return specs


def warm_up(workers: Sequence[Worker], n: int, seed: int = 12345) -> None:
    """``n`` short requests of random, never-repeated tokens on every worker (first-call costs)."""
    if n <= 0:
        return

    def go(w: Worker) -> None:
        rng = random.Random(f"{seed}-{w.spec.port}")
        for k in range(n):
            ids = [rng.randrange(3, 1024) for _ in range(64 + 192 * (k % 3))]
            r = requests.post(w.url + "/generate", timeout=300, json={
                "input_ids": ids,
                "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}})
            r.raise_for_status()

    with ThreadPoolExecutor(len(workers)) as ex:
        list(ex.map(go, workers))


def calibrate(worker: Worker, workload: BenchWorkload, k: int, timeout: float
              ) -> list[dict[str, float]]:
    """Prefill vs. whole-request time of ``k`` workload prompts, alone on an idle worker.

    Each sampled prompt gets a calibration-only first token, so it misses the cache;
    it is sent twice: the first (miss) gives TTFT ~ the full prefill and E2E; the
    second (hit) gives TTFT with the prefix cached.
    """
    roots = [r for r in workload.requests if r.parent is None]
    if k <= 0 or not roots:
        return []
    picks = [roots[int(i * len(roots) / k)] for i in range(min(k, len(roots)))]
    out = []
    for j, r in enumerate(picks):
        ids = [1000 + j % 23, *r.input_ids[1:]]
        miss = run_one(worker.url, ids, r.max_new_tokens, timeout)
        hit = run_one(worker.url, ids, r.max_new_tokens, timeout)
        if not (miss.ok and hit.ok):
            raise RuntimeError(f"calibration request failed: {miss.error or hit.error}")
        out.append({"prompt_tokens": len(ids), "output_tokens": r.max_new_tokens,
                    "ttft_miss_s": miss.ttft_s, "e2e_miss_s": miss.e2e_s,
                    "ttft_hit_s": hit.ttft_s, "e2e_hit_s": hit.e2e_s,
                    "cached_tokens_hit": hit.cached_tokens})
    return out


def attribute(records: Sequence[RequestRecord], logged: Sequence[dict[str, Any]],
              workers: Sequence[str]) -> int:
    """Fill in each record's worker, pulled and shipped tokens from the workers' request
    log (``workers``: their broker addresses in the run's order); return how many were
    found. The log also holds warm-up and calibration requests, which match nothing."""
    by_rid = {str(r.get("rid")): r for r in logged}
    index = {w: i for i, w in enumerate(workers)}
    found = 0
    for rec in records:
        r = by_rid.get(rec.server_rid) if rec.server_rid else None
        if r is None:
            continue
        rec.worker = index.get(r.get("worker"))
        rec.pulled_tokens = int(r.get("pulled_tokens") or 0)
        rec.shipped_tokens = int(r.get("shipped_tokens") or 0)
        found += 1
    return found


def run_config(cfg: Config, s: ClusterSettings, workload: BenchWorkload, log_dir: str | Path,
               on_done: Optional[Callable[[RequestRecord], None]] = None,
               say: Callable[[str], None] = print,
               on_replay: Optional[Callable[[], None]] = None) -> ConfigResult:
    """Start, measure and stop one configuration (always stopped, also on errors)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("*.log"):  # an earlier attempt's logs: kept aside, not mixed in
        old.replace(old.with_name(old.name + ".prev"))
    request_log = log_dir / "requests.jsonl"
    request_log.unlink(missing_ok=True)  # an earlier attempt's
    t0 = time.monotonic()
    pool = PoolSpec.pick(s.workers)
    budgets = cpu_budgets(s, pool.ports)
    specs = worker_specs(cfg, s, budgets=budgets, pool=pool, request_log=request_log)
    say(f"[{cfg.name}] starting {len(specs)} workers (--cache-backend {cfg.backend}"
        + (f", {s.cpu_quota:g} cores each by {budgets[0].mech.kind}" if budgets else "")
        + f"); logs in {log_dir}")
    workers: list[Worker] = []
    frontend: Optional[Frontend] = None
    try:
        for b in budgets:
            LIVE.add(b.create(limit=False))
        try:
            workers = start_workers(specs, str(log_dir), timeout=s.startup_timeout)
        except RuntimeError as e:
            # Killed by a signal while starting (negative exit code): not its own fault.
            if re.search(r"exited with code -\d+", str(e)):
                raise WorkerLost(str(e)) from e
            raise
        for w in workers:
            LIVE.add(w)
        if cfg.backend == "tokenlake":
            wait_pool(workers)
        for b in budgets:
            b.apply()
        kind = _frontend_kind(cfg, s)
        frontend = Frontend(kind, [w.url for w in workers], log_dir, frontend_flags(cfg, s, kind),
                            avoid_ports=[w.spec.port for w in workers])
        LIVE.add(frontend)
        frontend.start()
        sentinel = Sentinel(workers, frontend)
        startup_s = time.monotonic() - t0
        say(f"[{cfg.name}] ready in {startup_s:.0f}s; front end {kind} at {frontend.url}; "
            f"warm-up and calibration")
        warm_up(workers, s.warmup_requests)
        calib = calibrate(workers[0], workload, s.calibration_requests, s.request_timeout)
        brokers = [w.broker_addr if cfg.backend == "tokenlake" else None for w in workers]
        urls = [w.url for w in workers]
        before = counters.snapshot(urls, brokers)
        fe_before = frontend.stats()
        cpu_before = [b.stats() for b in budgets]
        if on_replay is not None:
            on_replay()
        t1 = time.monotonic()
        try:
            records = run_replay(frontend.url, workload.requests, s.request_timeout, on_done,
                                 sentinel)
        except RuntimeError as e:
            raise WorkerLost(str(e)) from e
        replay_s = time.monotonic() - t1
        if cfg.backend == "tokenlake" and request_log.exists():
            attribute(records, read_request_log(str(request_log)), pool.broker_addrs)
        cpu = [{**b.record(), **{k: v - c0.get(k, 0) for k, v in b.stats().items()}}
               for b, c0 in zip(budgets, cpu_before)]
        after = counters.snapshot(urls, brokers)
        fe_after = frontend.stats()
        per_worker = [{"url": u, **d} for u, d in zip(urls, counters.diff(after, before))]
        fe_stats = frontend_delta(fe_before, fe_after)
        lost = sentinel()
        if lost:
            raise WorkerLost(lost)
        return ConfigResult(cfg.name, cfg.backend, kind, workload.name,
                            float(workload.params.get("rate", 0.0)), records, per_worker, calib,
                            fe_stats, round(startup_s, 2), round(replay_s, 2), str(log_dir),
                            cpu)
    except BaseException as e:
        if workers and not isinstance(e, KeyboardInterrupt):
            for w in workers:
                if not w.alive():
                    say(f"[{cfg.name}] {w.name} is not running; log tail:\n{w.log_tail()}")
        raise
    finally:
        if frontend is not None:
            frontend.stop()
            if frontend in LIVE.items:
                LIVE.items.remove(frontend)
        for w in workers:
            w.stop()
            if w in LIVE.items:
                LIVE.items.remove(w)
        for b in budgets:  # after the workers: a cgroup goes once its processes are gone
            b.remove()
            if b in LIVE.items:
                LIVE.items.remove(b)
