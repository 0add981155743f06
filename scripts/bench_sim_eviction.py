"""Benchmark: CPU seconds of a simulator run with ``--eviction aware`` against ``lru``.

The eviction study's Mooncake cells (second half of each trace, TokenLake, N = 4 and 16,
capacity 10% and 20%; results/sim/eviction.md), run ``--repeats`` times with the two
orders interleaved. Each run's ``cpu_s`` is the CPU time of its ``simulate`` call alone
(``time.process_time``: other load on the machine does not count, loading the trace does
not either). Reports the median per cell and the ratio aware / lru. Writes JSON (``--out``).

    python scripts/bench_sim_eviction.py --out results/bench_sim_eviction.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

from sglang_tokenlake.sim.__main__ import main as sim_main


def runs(workload: str, eviction: str, out: Path) -> list[dict]:
    argv = ["--workload", workload, "--split", "second", "--instances", "4", "16",
            "--capacity", "0.1", "0.2", "--target-util", "0.7", "--policies", "tokenlake",
            "--eviction", eviction, "--jobs", "1", "--no-plots", "--out", str(out), "--tag", "run"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sim_main(argv)
    return json.loads((out / "run.json").read_text())["runs"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+",
                   default=["mooncake-synthetic", "mooncake-conversation"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cpu: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for wl in args.workloads:
                for ev in ("lru", "aware"):
                    for r in runs(wl, ev, Path(tmp)):
                        cell = (wl, r["instances"], r["capacity_frac"])
                        cpu.setdefault(cell + (ev,), []).append(r["cpu_s"])
    rows = []
    for wl in args.workloads:
        for (w, n, frac, ev), xs in sorted(cpu.items()):
            if w != wl or ev != "lru":
                continue
            lru = statistics.median(xs)
            aware = statistics.median(cpu[(w, n, frac, "aware")])
            rows.append({"workload": w, "instances": n, "capacity_frac": frac,
                         "lru_cpu_s": round(lru, 3), "aware_cpu_s": round(aware, 3),
                         "aware_over_lru": round(aware / lru, 3),
                         "lru_all": xs, "aware_all": cpu[(w, n, frac, "aware")]})
            print(json.dumps(rows[-1]))
    ratios = [r["aware_over_lru"] for r in rows]
    doc = {"command": "python scripts/bench_sim_eviction.py " + " ".join(argv or sys.argv[1:]),
           "repeats": args.repeats, "cells": rows,
           "median_aware_over_lru": round(statistics.median(ratios), 3),
           "total_aware_over_lru": round(sum(r["aware_cpu_s"] for r in rows)
                                         / sum(r["lru_cpu_s"] for r in rows), 3)}
    print(json.dumps({k: doc[k] for k in ("median_aware_over_lru", "total_aware_over_lru")}))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
