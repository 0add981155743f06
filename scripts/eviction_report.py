"""Assemble results/sim/eviction.{md,json} from the simulator runs in results/sim/eviction_runs/.

The runs (see results/sim/eviction.md for the commands): per workload one ``--eviction lru``
and one ``--eviction aware`` invocation; Mooncake traces also run ``belady``.

    python scripts/eviction_report.py [--runs results/sim/eviction_runs] [--out results/sim]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MOONCAKE = ("synthetic", "conversation")
GENERATED = ("loogle", "scbench", "sharegpt", "gsp")


def _load(runs: Path, stem: str) -> dict | None:
    p = runs / f"{stem}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _cells(doc: dict) -> dict[tuple[int, float], dict[str, dict]]:
    out: dict[tuple[int, float], dict[str, dict]] = {}
    for r in doc["runs"]:
        out.setdefault((r["instances"], r["capacity_frac"]), {})[r["policy"]] = r
    return out


def build(runs: Path) -> dict:
    rows, gen, commands, infinite = [], [], [], {}
    for name in MOONCAKE + GENERATED:
        lru, aware = _load(runs, f"{name}_lru"), _load(runs, f"{name}_aware")
        if lru is None or aware is None:
            continue
        commands += [lru["command"], aware["command"]]
        infinite[name] = lru["workload"]["infinite_cache_hit_rate"]
        a_cells = _cells(aware)
        for (n, frac), c in sorted(_cells(lru).items()):
            a = a_cells.get((n, frac), {})
            hr = lambda d, p: d[p]["token_hit_rate"] if p in d else None  # noqa: E731
            row = {"workload": name, "instances": n, "capacity": frac,
                   "limit_lru": hr(c, "limit"), "limit_aware": hr(a, "limit"),
                   "tokenlake_lru": hr(c, "tokenlake"), "tokenlake_aware": hr(a, "tokenlake"),
                   "belady": hr(c, "belady"),
                   "wall_s_tokenlake_lru": c.get("tokenlake", {}).get("wall_s"),
                   "wall_s_tokenlake_aware": a.get("tokenlake", {}).get("wall_s"),
                   "wall_s_limit_lru": c.get("limit", {}).get("wall_s"),
                   "wall_s_limit_aware": a.get("limit", {}).get("wall_s")}
            (rows if name in MOONCAKE else gen).append(row)
    return {"commands": commands, "infinite_cache_hit_rate": infinite,
            "mooncake": rows, "generated": gen}


def _r(x, y) -> str:
    return f"{x / y:.3f}" if x is not None and y else "-"


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(doc: dict) -> str:
    out = ["| trace | N | capacity | limit LRU | limit aware | TL LRU | TL aware | Belady | "
           "**TL aware / limit LRU** | limit aware / limit LRU | Belady / limit LRU | "
           "wall TL LRU / aware (s) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    met = worst = 0
    ratios = []
    for r in doc["mooncake"]:
        q = r["tokenlake_aware"] / r["limit_lru"] if r["limit_lru"] else 0.0
        ratios.append(q)
        met += q >= 1.10
        out.append(f"| {r['workload']} | {r['instances']} | {r['capacity']:.0%} | "
                   f"{_f(r['limit_lru'])} | {_f(r['limit_aware'])} | {_f(r['tokenlake_lru'])} | "
                   f"{_f(r['tokenlake_aware'])} | {_f(r['belady'])} | "
                   f"**{_r(r['tokenlake_aware'], r['limit_lru'])}** | "
                   f"{_r(r['limit_aware'], r['limit_lru'])} | {_r(r['belady'], r['limit_lru'])} | "
                   f"{r['wall_s_tokenlake_lru']} / {r['wall_s_tokenlake_aware']} |")
    worst = min(ratios) if ratios else 0.0
    out += ["", f"Cells with TL aware >= 1.10x limit LRU: {met} of {len(ratios)}; "
            f"lowest ratio {worst:.3f}.", "",
            "| workload | capacity | TL LRU | TL aware | TL aware / LRU | limit LRU | "
            "limit aware | limit aware / LRU | wall TL LRU / aware (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["generated"]:
        out.append(f"| {r['workload']} | {r['capacity']:.0%} | {_f(r['tokenlake_lru'])} | "
                   f"{_f(r['tokenlake_aware'])} | {_r(r['tokenlake_aware'], r['tokenlake_lru'])} | "
                   f"{_f(r['limit_lru'])} | {_f(r['limit_aware'])} | "
                   f"{_r(r['limit_aware'], r['limit_lru'])} | "
                   f"{r['wall_s_tokenlake_lru']} / {r['wall_s_tokenlake_aware']} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=Path, default=Path("results/sim/eviction_runs"))
    p.add_argument("--out", type=Path, default=Path("results/sim"))
    args = p.parse_args()
    doc = build(args.runs)
    (args.out / "eviction.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
