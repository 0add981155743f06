"""``python -m sglang_tokenlake.sim``: compare cache policies on a workload.

Example (the headline run; see docs/simulator.md)::

    python -m sglang_tokenlake.sim --workload mooncake-conversation \\
        --instances 4 8 16 64 --capacity 0.1 0.2 0.3 0.4 --target-util 0.7 \\
        --jobs 2 --out results/sim --tag conversation_u07
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from sglang_tokenlake.dispatch import ModelShape
from sglang_tokenlake.eviction import EVICTIONS, AwareParams
from sglang_tokenlake.policy import PLACEMENTS, REMOTE_MODES, PolicyConfig
from sglang_tokenlake.sim import report
from sglang_tokenlake.sim.compute import ComputeModel
from sglang_tokenlake.sim.engine import ALL_POLICIES, POLICIES, SimConfig, simulate, time_stretch
from sglang_tokenlake.sim.routing import CacheAwareConfig
from sglang_tokenlake.sim.workloads import Workload, load

_WORKLOAD: Optional[Workload] = None  # set before forking workers


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_tokenlake.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="mooncake-conversation",
                   help="mooncake-conversation, mooncake-synthetic, loogle, scbench, sharegpt, "
                        "gsp, longctx, or a path to a Mooncake-format JSONL")
    p.add_argument("--limit", type=int, default=None, help="use only the first N requests")
    p.add_argument("--seed", type=int, default=0, help="seed of generated workloads")
    p.add_argument("--instances", type=int, nargs="+", default=[4, 8, 16, 64])
    p.add_argument("--capacity", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4],
                   help="total cache capacity as fractions of the workload's unique full blocks")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=ALL_POLICIES,
                   help="belady: the offline bound (limit evicting what is reused furthest "
                        "ahead); stock_bounded: stock workers behind the harness's "
                        "bounded_load proxy (prefix homes, loads bounded)")
    p.add_argument("--split", choices=("all", "first", "second"), default="all",
                   help="use the first or second half of the workload by arrival time "
                        "(tune on one, report on the other)")
    p.add_argument("--eviction", choices=EVICTIONS, default=PolicyConfig.eviction,
                   help="eviction order of the pooled caches (tokenlake, limit, mooncake)")
    p.add_argument("--aware-freq-weight", type=float, default=AwareParams.freq_weight,
                   help="aware eviction: extra lifetimes per doubling of a block's uses")
    p.add_argument("--aware-depth-weight", type=float, default=AwareParams.depth_weight,
                   help="aware eviction: extra lifetimes per doubling of a block's depth")
    load_g = p.add_mutually_exclusive_group()
    load_g.add_argument("--target-util", type=float, nargs="+", default=[0.7],
                        help="scale arrivals so the uncached GPU work is this fraction of the "
                             "cluster's GPU time (per instance count); several values sweep load")
    load_g.add_argument("--rate-scale", type=float, default=None,
                        help="multiply the arrival rate by this instead (timestamps / X)")
    p.add_argument("--bandwidth-gbps", type=float, default=25.0,
                   help="GB/s of one transfer between two instances")
    p.add_argument("--placement-choices", type=int, default=PolicyConfig.placement_choices,
                   help="TokenLake: candidate homes of a new segment")
    p.add_argument("--placement", choices=PLACEMENTS, default=PolicyConfig.placement,
                   help="TokenLake: where a request's new segments are kept (segment: each "
                        "at its own home; chain: together; executor: where computed)")
    p.add_argument("--no-pool-leaf-first", action="store_true",
                   help="TokenLake: drop the pool-wide leaf-first eviction rule")
    p.add_argument("--spill-margin", type=float, default=PolicyConfig.spill_margin,
                   help="TokenLake: hand the pool's last copy of an evicted segment to the "
                        "member with the oldest data when that is more than this many times "
                        "older (live --tokenlake-spill-margin; 0: off)")
    p.add_argument("--spill-hops", type=int, default=PolicyConfig.spill_hops,
                   help="TokenLake with --spill-margin: drop a segment handed over this many "
                        "times since its last use instead of handing it on (live "
                        "--tokenlake-spill-hops; 0: no limit)")
    p.add_argument("--remote-mode", choices=REMOTE_MODES, default=PolicyConfig.remote_mode,
                   help="TokenLake: serve remote segments by the least time (auto) or always "
                        "ship / pull (live --tokenlake-remote-mode)")
    p.add_argument("--spill-window", type=float, default=SimConfig.spill_window_s,
                   help="TokenLake with --spill-margin: simulated seconds in which a member "
                        "receives at most a quarter of its capacity (live: the heartbeat "
                        "interval)")
    p.add_argument("--replica-budget", type=float, default=PolicyConfig.replica_budget,
                   help="TokenLake: share of the pool hot-segment replicas may use")
    p.add_argument("--no-memory-pressure", action="store_true",
                   help="running requests' KV does not shrink the caches (the old model)")
    p.add_argument("--shared-prefix-kv", action="store_true",
                   help="memory pressure counts only prompt KV held outside the executor's "
                        "cache (TokenLake pays for pulled/recomputed copies)")
    p.add_argument("--prefill-visibility", action="store_true",
                   help="a computed prefix serves other requests only once its prefill has "
                        "finished; hits are decided when a request starts")
    p.add_argument("--cache-threshold", type=float, default=CacheAwareConfig.cache_threshold)
    p.add_argument("--balance-abs-threshold", type=int,
                   default=CacheAwareConfig.balance_abs_threshold)
    p.add_argument("--balance-rel-threshold", type=float,
                   default=CacheAwareConfig.balance_rel_threshold)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=Path("results/sim"))
    p.add_argument("--tag", default=None, help="output file stem (default: the workload name)")
    p.add_argument("--no-plots", action="store_true")
    return p


def _run(task: tuple[str, SimConfig, float, Optional[float]]) -> dict[str, Any]:
    policy, cfg, frac, util = task
    assert _WORKLOAD is not None
    cpu = time.process_time()
    res = simulate(_WORKLOAD, policy, cfg)
    cpu = time.process_time() - cpu  # this run's CPU seconds (other load does not count)
    return {"capacity_frac": frac, "target_util": util,
            "rate_scale": round(1 / cfg.time_stretch, 4), **res.summary(),
            "cpu_s": round(cpu, 3)}


def main(argv: Optional[list[str]] = None) -> int:
    global _WORKLOAD
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    wl = split(load(args.workload, args.limit, args.seed), args.split)
    _WORKLOAD = wl
    info = wl.summary()
    print(f"workload {info}", file=sys.stderr)
    shape = wl.shape or ModelShape()
    compute = (ComputeModel() if wl.shape is None else ComputeModel.roofline(
        params=7.0e9, layers=shape.layers, q_heads=shape.q_heads, kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, dtype_bytes=shape.dtype_bytes))
    policy = PolicyConfig(replica_budget=args.replica_budget,
                          placement_choices=args.placement_choices,
                          placement=args.placement,
                          pool_leaf_first=not args.no_pool_leaf_first,
                          eviction=args.eviction,
                          spill_margin=args.spill_margin, spill_hops=args.spill_hops,
                          remote_mode=args.remote_mode,
                          aware=AwareParams(args.aware_freq_weight, args.aware_depth_weight))
    router = CacheAwareConfig(args.cache_threshold, args.balance_abs_threshold,
                              args.balance_rel_threshold)
    utils: list[Optional[float]] = [None] if args.rate_scale is not None else args.target_util
    tasks = []
    stretches = {}
    for u, n in itertools.product(utils, args.instances):
        stretches[(u, n)] = (1.0 / args.rate_scale if u is None
                             else time_stretch(wl, n, compute, u))
    for u, n, frac, pol in itertools.product(utils, args.instances, args.capacity, args.policies):
        cfg = SimConfig(
            instances=n,
            capacity_blocks=max(1, int(frac * info["unique_full_blocks"] / n)),
            segment_size=wl.segment_size, time_stretch=stretches[(u, n)], compute=compute,
            shape=shape, bandwidth_Bps=args.bandwidth_gbps * 1e9, router=router, policy=policy,
            memory_pressure=not args.no_memory_pressure, shared_prefix_kv=args.shared_prefix_kv,
            prefill_visibility=args.prefill_visibility, spill_window_s=args.spill_window,
        )
        tasks.append((pol, cfg, frac, u))
    # Same instance count back to back: a worker process reuses its memoized homes.
    runs = _execute(tasks, args.jobs)
    runs.sort(key=lambda r: (r["target_util"] or 0, r["instances"], r["capacity_frac"],
                             report.ORDER.index(r["policy"])))
    doc = {
        "command": "python -m sglang_tokenlake.sim " + " ".join(argv or sys.argv[1:]),
        "workload": info,
        "load": (f"arrival rate x{args.rate_scale}" if args.rate_scale is not None
                 else "target_util = uncached GPU work / cluster GPU time"),
        "rate_scale": {f"util={u} N={n}": round(1 / st, 4) for (u, n), st in stretches.items()},
        "compute": dataclasses.asdict(compute),
        "router_v019": dataclasses.asdict(CacheAwareConfig.v019()),
        "config": {k: (v if not dataclasses.is_dataclass(v) else dataclasses.asdict(v))
                   for k, v in dataclasses.asdict(tasks[0][1]).items()
                   if k not in ("instances", "capacity_blocks", "time_stretch")},
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_count": os.cpu_count(),
        "jobs": args.jobs,
        "runs": runs,
    }
    paths = report.write(doc, args.out, args.tag or wl.name, plots=not args.no_plots)
    print(report.markdown(doc))
    print(f"wall {doc['wall_s']} s; wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def split(wl: Workload, half: str) -> Workload:
    """The requests of ``wl`` before (``first``) or from (``second``) its mid time."""
    if half == "all" or not wl.requests:
        return wl
    mid = wl.requests[0].arrival_s + wl.duration_s() / 2
    reqs = [r for r in wl.requests if (r.arrival_s < mid) == (half == "first")]
    return dataclasses.replace(wl, name=f"{wl.name}[{half}]", requests=reqs)


def _execute(tasks: list, jobs: int) -> list[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="runs", unit="run", file=sys.stderr)
    out = []
    if jobs <= 1:
        for t in tasks:
            out.append(_run(t))
            bar.update()
    else:
        with mp.get_context("fork").Pool(jobs) as pool:
            for r in pool.imap_unordered(_run, tasks):
                out.append(r)
                bar.set_postfix_str(f"N={r['instances']} {r['policy']} {r['wall_s']}s")
                bar.update()
    bar.close()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
