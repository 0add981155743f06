"""Choose the proxy's ``--load-factor`` with the simulator, on seeds the live run does not use.

Replays a harness run's workload generator with other seeds (``--seeds``) at several rates
in the live replay's model (``sim.live``: the run's workers, KV capacity, segment size and
calibrated compute) and prints, per rate and seed, the simulated hit rate, load CV, TTFT
p50 / p90 and the share of requests with TTFT within ``--slo-ttft`` for the router
(cache-aware, its defaults), TokenLake behind the router at the pool's bound and at the
router's defaults, and stock and TokenLake behind ``bounded_load`` at each load factor.
Writes JSON (``--out``).

    python scripts/sim_load_factor.py results/bench-longdoc-200 --seeds 1 2 --rates 2 3 4 \\
        --out results/bench-longdoc-bounded/sim_load_factor.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from sglang_tokenlake.sim.engine import simulate
from sglang_tokenlake.sim.live import calibrated, pool_config_of, replay_requests
from sglang_tokenlake.sim.model import SimConfig
from sglang_tokenlake.sim.routing import CacheAwareConfig


def cell(run: Path, seed: int, rate: float, factors: list[float], slo: float) -> list[dict]:
    bench = json.loads((run / "bench.json").read_text())
    st = bench["meta"]["settings"]
    S, kv, n = int(st["segment_size"]), int(st["max_total_tokens"]), int(st["workers"])
    meta = json.loads(json.dumps(bench["meta"]["workloads"][0]))
    meta["params"].update(seed=seed, rate=rate)
    wl, cpt, _ = replay_requests(meta, {}, S)
    pool = pool_config_of(st)
    cfg = SimConfig(n, kv // S, S, compute=calibrated(bench.get("calibration", []), kv),
                    chars_per_token=cpt, policy=pool.policy(), shared_prefix_kv=True,
                    prefill_visibility=True, radix_nodes=True, match_at_admission=True,
                    spill_window_s=pool.heartbeat_interval)
    runs = [("stock-cache-aware", "cache_aware", {}),
            ("tokenlake-cache-aware (pool bound)", "tokenlake",
             dict(tokenlake_executor="cache_aware", tokenlake_router=CacheAwareConfig.pool())),
            ("tokenlake-cache-aware (router defaults)", "tokenlake",
             dict(tokenlake_executor="cache_aware", tokenlake_router=CacheAwareConfig()))]
    for c in factors:
        runs += [(f"stock-bounded {c:g}", "stock_bounded", dict(load_factor=c)),
                 (f"tokenlake-bounded {c:g}", "tokenlake",
                  dict(tokenlake_executor="bounded_load", load_factor=c))]
    rows = []
    for name, policy, over in runs:
        r = simulate(wl, policy, replace(cfg, **over))
        s = r.summary()
        rows.append({"seed": seed, "rate": rate, "config": name,
                     "hit_rate": round(r.hit_rate, 4), "load_cv": round(r.load_cv, 4),
                     "ttft_p50_s": s["ttft_p50_s"], "ttft_p90_s": s["ttft_p90_s"],
                     "ttft_within_slo": round(sum(t <= slo for t in r.ttft) / len(r.ttft), 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a harness output folder (its bench.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rates", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    p.add_argument("--load-factors", type=float, nargs="+", default=[1.25, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if not (a.run / "bench.json").exists():
        p.error(f"{a.run / 'bench.json'} not found: give a harness output folder")
    rows = [r for seed in a.seeds for rate in a.rates
            for r in cell(a.run, seed, rate, a.load_factors, a.slo_ttft)]
    print("| seed | rate | config | hit rate | load CV | TTFT p50 s | TTFT p90 s | TTFT <= SLO |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['seed']} | {r['rate']:g} | {r['config']} | {r['hit_rate']:.3f} | "
              f"{r['load_cv']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_p90_s']:.2f} | "
              f"{r['ttft_within_slo']:.2f} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"run": str(a.run), "seeds": a.seeds, "rates": a.rates,
                                     "slo_ttft_s": a.slo_ttft, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
