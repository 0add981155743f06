"""Simulator output: JSON, a markdown table and PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

ORDER = ("stock", "cache_aware", "mooncake", "tokenlake", "limit")


def _cells(runs: list[dict]) -> dict[tuple[int, float], dict[str, dict]]:
    by: dict[tuple[int, float], dict[str, dict]] = defaultdict(dict)
    for r in runs:
        by[(r["instances"], r["capacity_frac"])][r["policy"]] = r
    return dict(sorted(by.items()))


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not b["token_hit_rate"]:
        return "-"
    return f"{a['token_hit_rate'] / b['token_hit_rate']:.2f}"


def markdown(doc: dict[str, Any]) -> str:
    """The results table: hit rate per policy, TokenLake's ratios, load CVs, TTFT."""
    runs = doc["runs"]
    pols = [p for p in ORDER if any(r["policy"] == p for r in runs)]
    w = doc["workload"]
    lines = [
        f"Workload `{w['name']}`: {w['requests']} requests, {w['unique_full_blocks']} unique "
        f"full blocks of {w['segment_tokens']} tokens; infinite-cache token hit rate "
        f"{w['infinite_cache_hit_rate']:.3f}. Load: {doc['load']}.",
        "",
        "Token hit rate per policy (capacity = total cache as a fraction of the unique full "
        "blocks); TL = tokenlake, CA = cache_aware; CV = per-instance GPU-seconds coefficient "
        "of variation; TTFT p50 in seconds.",
        "",
        "| N | capacity | " + " | ".join(pols) + " | TL/limit | TL/CA | CV TL | CV CA | "
        "TTFT p50 TL | TTFT p50 CA |",
        "|" + "---:|" * (len(pols) + 8),
    ]
    for (n, cap), cell in _cells(runs).items():
        tl, ca, lim = cell.get("tokenlake"), cell.get("cache_aware"), cell.get("limit")
        row = [str(n), f"{cap:.0%}"]
        row += [f"{cell[p]['token_hit_rate']:.3f}" if p in cell else "-" for p in pols]
        row += [_ratio(tl, lim), _ratio(tl, ca)]
        row += [f"{x['load_cv']:.1%}" if x else "-" for x in (tl, ca)]
        row += [f"{x['ttft_p50_s']:.2f}" if x else "-" for x in (tl, ca)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], out_dir: Path, tag: str, plots: bool = True) -> list[Path]:
    """Write ``<tag>.json``, ``<tag>.md`` and (``plots``) three PNGs; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{tag}.json", out_dir / f"{tag}.md"]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(markdown(doc))
    if plots:
        paths += _plots(doc, out_dir, tag)
    return paths


def _plots(doc: dict[str, Any], out_dir: Path, tag: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    cells = _cells(runs)
    ns = sorted({n for n, _ in cells})
    caps = sorted({c for _, c in cells})
    pols = [p for p in ORDER if any(r["policy"] == p for r in runs)]
    out = []

    fig, axes = plt.subplots(1, len(ns), figsize=(3.2 * len(ns), 3.0), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], ns):
        for p in pols:
            xs = [c for c in caps if p in cells.get((n, c), {})]
            ax.plot([100 * c for c in xs], [cells[(n, c)][p]["token_hit_rate"] for c in xs],
                    marker="o", label=p)
        ax.set_title(f"{n} instances")
        ax.set_xlabel("total capacity (% of unique blocks)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("token hit rate")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out.append(out_dir / f"{tag}_hit_rate.png")
    fig.savefig(out[-1], dpi=90)
    plt.close(fig)

    mid = caps[len(caps) // 2]
    fig, axes = plt.subplots(1, len(ns), figsize=(3.2 * len(ns), 3.0), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], ns):
        for j, p in enumerate(pols):
            r = cells.get((n, mid), {}).get(p)
            if not r:
                continue
            busy = r["busy_s_per_instance"]
            mean = sum(busy) / len(busy) or 1.0
            ax.scatter([j] * len(busy), [b / mean for b in busy], s=8, alpha=0.6)
        ax.set_xticks(range(len(pols)), [p.replace("_", "\n") for p in pols], fontsize=7)
        ax.set_title(f"{n} instances, capacity {mid:.0%}")
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("GPU-seconds / mean (per instance)")
    fig.tight_layout()
    out.append(out_dir / f"{tag}_load.png")
    fig.savefig(out[-1], dpi=90)
    plt.close(fig)

    kinds = sorted({k for r in runs for k in r["bytes"]})
    movers = [p for p in ("mooncake", "tokenlake") if p in pols]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ns) * max(len(movers), 1), 3.2))
    labels, bottoms = [], None
    xs = [(n, p) for n in ns for p in movers if p in cells.get((n, mid), {})]
    bottoms = [0.0] * len(xs)
    for kind in kinds:
        vals = [cells[(n, mid)][p]["bytes"].get(kind, 0) / cells[(n, mid)][p]["requests"] / 1e9
                for n, p in xs]
        ax.bar(range(len(xs)), vals, bottom=bottoms, label=kind)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    labels = [f"{p}\nN={n}" for n, p in xs]
    ax.set_xticks(range(len(xs)), labels, fontsize=7)
    ax.set_ylabel("GB moved per request")
    ax.set_title(f"bytes moved by mode, capacity {mid:.0%}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(out_dir / f"{tag}_bytes.png")
    fig.savefig(out[-1], dpi=90)
    plt.close(fig)
    return out
