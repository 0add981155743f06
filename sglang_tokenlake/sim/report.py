"""Simulator output: JSON, markdown tables and PNG plots.

Runs are grouped by load (``target_util``), instance count and capacity. Plots per
load: token hit rate vs capacity (one panel per instance count), per-instance GPU
load at the middle capacity, bytes moved per request by mode; across loads (when
there are several): hit rate and median TTFT against load.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

ORDER = ("stock", "cache_aware", "cache_aware_v019", "stock_bounded", "mooncake", "tokenlake",
         "limit", "belady")

Cells = dict[tuple[int, float], dict[str, dict]]


def _by_load(runs: list[dict]) -> dict[Optional[float], Cells]:
    out: dict[Optional[float], Cells] = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        out[r.get("target_util")][(r["instances"], r["capacity_frac"])][r["policy"]] = r
    return {u: dict(sorted(c.items())) for u, c in sorted(out.items(), key=lambda kv: kv[0] or 0)}


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not b["token_hit_rate"]:
        return "-"
    return f"{a['token_hit_rate'] / b['token_hit_rate']:.2f}"


def _load_label(u: Optional[float], cells: Cells) -> str:
    if u is None:
        r = next(iter(next(iter(cells.values())).values()))
        return f"arrival rate x{r['rate_scale']}"
    return f"target_util {u:g} (uncached GPU work = {u:.0%} of the cluster's GPU time)"


def markdown(doc: dict[str, Any]) -> str:
    """Per load, the results table: hit rate per policy, TokenLake's ratios, load CVs, TTFT."""
    runs = doc["runs"]
    pols = [p for p in ORDER if any(r["policy"] == p for r in runs)]
    w = doc["workload"]
    lines = [
        f"Workload `{w['name']}`: {w['requests']} requests, {w['unique_full_blocks']} unique "
        f"full blocks of {w['segment_size']} tokens; infinite-cache token hit rate "
        f"{w['infinite_cache_hit_rate']:.3f}.",
        "",
        "Token hit rate per policy; capacity = total cache as a fraction of the unique full "
        "blocks; TL = tokenlake, CA = cache_aware (sglang-router 0.3.2), CA019 = "
        "cache_aware_v019 (<= 0.1.9); CV = coefficient of variation of the per-instance "
        "GPU-seconds; TTFT p50 in seconds.",
    ]
    v019 = "cache_aware_v019" in pols
    for u, cells in _by_load(runs).items():
        lines += [
            "",
            f"**Load: {_load_label(u, cells)}**",
            "",
            "| N | capacity | " + " | ".join(pols) + " | TL/limit | TL/CA | "
            + ("TL/CA019 | " if v019 else "") + "CV TL | CV CA | "
            + ("CV CA019 | " if v019 else "") + "TTFT p50 TL | TTFT p50 CA |",
            "|" + "---:|" * (len(pols) + 8 + 2 * v019),
        ]
        for (n, cap), cell in cells.items():
            tl, ca, lim = cell.get("tokenlake"), cell.get("cache_aware"), cell.get("limit")
            ca0 = cell.get("cache_aware_v019")
            row = [str(n), f"{cap:.0%}"]
            row += [f"{cell[p]['token_hit_rate']:.3f}" if p in cell else "-" for p in pols]
            row += [_ratio(tl, lim), _ratio(tl, ca)] + ([_ratio(tl, ca0)] if v019 else [])
            cvs = (tl, ca, ca0) if v019 else (tl, ca)
            row += [f"{x['load_cv']:.1%}" if x else "-" for x in cvs]
            row += [f"{x['ttft_p50_s']:.2f}" if x else "-" for x in (tl, ca)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], out_dir: Path, tag: str, plots: bool = True) -> list[Path]:
    """Write ``<tag>.json``, ``<tag>.md`` and (``plots``) the PNGs; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{tag}.json", out_dir / f"{tag}.md"]
    head = json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1)
    runs = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in doc["runs"])
    paths[0].write_text(head[:-2] + ',\n "runs": [\n' + runs + "\n ]\n}\n")  # a run a line
    paths[1].write_text(markdown(doc))
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        by = _by_load(doc["runs"])
        for u, cells in by.items():
            stem = tag if len(by) == 1 else f"{tag}_u{u:g}"
            paths += _plots(cells, out_dir, stem, _load_label(u, cells))
        if len(by) > 1:
            paths.append(_sweep(by, out_dir, tag))
    return paths


def _pols(cells: Cells) -> list[str]:
    return [p for p in ORDER if any(p in c for c in cells.values())]


def _plots(cells: Cells, out_dir: Path, stem: str, label: str) -> list[Path]:
    import matplotlib.pyplot as plt

    ns = sorted({n for n, _ in cells})
    caps = sorted({c for _, c in cells})
    pols = _pols(cells)
    mid = caps[len(caps) // 2]
    out = []

    fig, axes = plt.subplots(1, len(ns), figsize=(3.2 * len(ns), 3.2), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], ns):
        for p in pols:
            xs = [c for c in caps if p in cells.get((n, c), {})]
            ax.plot([100 * c for c in xs], [cells[(n, c)][p]["token_hit_rate"] for c in xs],
                    marker="o", ms=3, label=p)
        ax.set_title(f"{n} instances", fontsize=9)
        ax.set_xlabel("capacity (% of unique blocks)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("token hit rate")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(label, fontsize=8)
    fig.tight_layout()
    out.append(out_dir / f"{stem}_hit_rate.png")
    fig.savefig(out[-1], dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(ns), figsize=(3.2 * len(ns), 3.2), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], ns):
        for j, p in enumerate(pols):
            r = cells.get((n, mid), {}).get(p)
            if not r:
                continue
            busy = r["busy_s_per_instance"]
            mean = sum(busy) / len(busy) or 1.0
            ax.scatter([j] * len(busy), [b / mean for b in busy], s=8, alpha=0.6)
        ax.set_xticks(range(len(pols)), [p.replace("_", "\n") for p in pols], fontsize=7)
        ax.set_title(f"{n} instances", fontsize=9)
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("GPU-seconds / mean, per instance")
    fig.suptitle(f"per-instance load, capacity {mid:.0%}; {label}", fontsize=8)
    fig.tight_layout()
    out.append(out_dir / f"{stem}_load.png")
    fig.savefig(out[-1], dpi=80)
    plt.close(fig)

    kinds = sorted({k for c in cells.values() for r in c.values() for k in r["bytes"]})
    xs = [(n, p) for n in ns for p in ("mooncake", "tokenlake") if p in cells.get((n, mid), {})]
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * max(len(xs), 1), 3.2))
    bottoms = [0.0] * len(xs)
    for kind in kinds:
        vals = [cells[(n, mid)][p]["bytes"].get(kind, 0) / cells[(n, mid)][p]["requests"] / 1e9
                for n, p in xs]
        ax.bar(range(len(xs)), vals, bottom=bottoms, label=kind)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_xticks(range(len(xs)), [f"{p}\nN={n}" for n, p in xs], fontsize=7)
    ax.set_ylabel("GB moved per request")
    ax.set_title(f"bytes moved by mode, capacity {mid:.0%}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(out_dir / f"{stem}_bytes.png")
    fig.savefig(out[-1], dpi=80)
    plt.close(fig)
    return out


def _sweep(by: dict[Optional[float], Cells], out_dir: Path, tag: str) -> Path:
    import matplotlib.pyplot as plt

    any_cells = next(iter(by.values()))
    ns = sorted({n for n, _ in any_cells})
    caps = sorted({c for _, c in any_cells})
    mid = caps[len(caps) // 2]
    pols = _pols(any_cells)
    utils = [u for u in by if u is not None]
    fig, axes = plt.subplots(2, len(ns), figsize=(3.2 * len(ns), 5.4), sharex=True, squeeze=False)
    for j, n in enumerate(ns):
        for p in pols:
            rs = [by[u].get((n, mid), {}).get(p) for u in utils]
            pts = [(u, r) for u, r in zip(utils, rs) if r]
            axes[0][j].plot([u for u, _ in pts], [r["token_hit_rate"] for _, r in pts],
                            marker="o", ms=3, label=p)
            axes[1][j].plot([u for u, _ in pts], [max(r["ttft_p50_s"], 1e-3) for _, r in pts],
                            marker="o", ms=3, label=p)
        axes[0][j].set_title(f"{n} instances, capacity {mid:.0%}", fontsize=9)
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("target_util (uncached work / GPU time)", fontsize=8)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("token hit rate")
    axes[1][0].set_ylabel("TTFT p50 (s)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{tag}_load_sweep.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
