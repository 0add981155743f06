"""PNG plots of a harness run (matplotlib, Agg): summary bars, TTFT CDFs, per-worker load,
and, when several rates ran, metrics against the request rate and goodput against the rate
(with the SLO attainment and, for a sweep, each configuration's peak marked)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sglang_tokenlake.bench.runner import ConfigResult

COLORS = {"stock-rr": "#9e9e9e", "stock-cache-aware": "#5c6bc0",
          "tokenlake-rr": "#ef6c00", "tokenlake-least-load": "#2e7d32",
          "tokenlake-p2c": "#ad1457", "tokenlake-cache-aware": "#00838f",
          "tokenlake-bounded": "#6a1b9a", "stock-bounded": "#8d6e63"}
DPI = 80


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _tag(wl: str, rate: float) -> str:
    return f"{wl}_r{rate:g}".replace(".", "p")


def summary_bars(ss: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    panels = [("hit_rate", "hit rate"), ("tokens_prefilled", "tokens prefilled"),
              ("throughput_rps", "throughput (req/s)"), ("ttft_p50_s", "TTFT p50 (s)"),
              ("ttft_p99_s", "TTFT p99 (s)"), ("load_cv_requests", "load CV (requests)")]
    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    names = [s["config"] for s in ss]
    for ax, (k, title) in zip(axes.flat, panels):
        vals = [s.get(k) if s.get(k) is not None else 0 for s in ss]
        ax.bar(range(len(ss)), vals, color=[COLORS.get(n, "#888") for n in names])
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(ss)))
        ax.set_xticklabels([n.replace("-", "\n", 1) for n in names], fontsize=7)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"{ss[0]['workload']} at {ss[0]['rate']:g} req/s", fontsize=11)
    _save(plt, fig, path)


def ttft_cdf(results: Sequence[ConfigResult], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for res in results:
        xs = np.sort([r.ttft_s for r in res.records if r.ok])
        if len(xs):
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=res.config,
                    color=COLORS.get(res.config))
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"TTFT CDF: {results[0].workload} at {results[0].rate:g} req/s", fontsize=10)
    _save(plt, fig, path)


def worker_load(ss: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [("worker_requests", "requests per worker"),
              ("worker_prefill_tokens", "tokens prefilled per worker"),
              ("worker_busy_s", "forward time per worker (s)")]
    width = 0.8 / max(len(ss), 1)
    for ax, (k, title) in zip(axes, panels):
        for j, s in enumerate(ss):
            vals = s.get(k) or []
            ax.bar(np.arange(len(vals)) + j * width, vals, width, label=s["config"],
                   color=COLORS.get(s["config"]))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("worker")
        n = max(len(s.get(k) or []) for s in ss)
        ax.set_xticks(np.arange(n) + width * (len(ss) - 1) / 2)
        ax.set_xticklabels([str(i) for i in range(n)])
    axes[0].legend(fontsize=7)
    _save(plt, fig, path)


def rate_sweep(ss: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    panels = [("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p99_s", "TTFT p99 (s)"),
              ("goodput_rps", "goodput (req/s)"), ("hit_rate", "hit rate")]
    for ax, (k, title) in zip(axes, panels):
        for cfg in dict.fromkeys(s["config"] for s in ss):
            pts = sorted((s["rate"], s.get(k)) for s in ss if s["config"] == cfg)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=cfg,
                    color=COLORS.get(cfg))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(ss[0]["workload"], fontsize=11)
    _save(plt, fig, path)


def goodput_vs_rate(ss: Sequence[dict[str, Any]], path: Path,
                    sweep: Optional[dict[str, Any]] = None) -> None:
    """Goodput (left) and SLO attainment (right) against the offered rate, per configuration."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rates = sorted({s["rate"] for s in ss})
    ax.plot(rates, rates, ":", color="#bbb", label="offered rate")
    for cfg in dict.fromkeys(s["config"] for s in ss):
        pts = sorted((s["rate"], s.get("goodput_rps"), s.get("slo_attainment"))
                     for s in ss if s["config"] == cfg)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=cfg, color=COLORS.get(cfg))
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=cfg,
                 color=COLORS.get(cfg))
    if sweep:
        for r in sweep["configs"]:
            if r["peak_goodput_rps"] is not None:
                ax.plot([r["peak_rate"]], [r["peak_goodput_rps"]], "*", ms=12,
                        color=COLORS.get(r["config"], "#888"))
        ax2.axhline(sweep["target_attainment"], ls="--", color="#c62828", lw=1)
        if sweep["nearest_rate"] is not None:
            ax.axvline(sweep["nearest_rate"], ls="--", color="#999", lw=1)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("goodput (req/s meeting the SLO)")
    ax2.set_xlabel("request rate (req/s)")
    ax2.set_ylabel("SLO attainment")
    ax2.set_ylim(0, 1.05)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{ss[0]['workload']}: goodput vs rate", fontsize=11)
    _save(plt, fig, path)


def write_all(out_dir: Path, results: Sequence[ConfigResult],
              summaries: Sequence[dict[str, Any]],
              sweeps: Optional[Sequence[dict[str, Any]]] = None) -> list[Path]:
    """All plots of a run; returns the files written."""
    written: list[Path] = []
    groups: dict[tuple[str, float], list[int]] = {}
    for i, s in enumerate(summaries):
        groups.setdefault((s["workload"], s["rate"]), []).append(i)
    for (wl, rate), idx in groups.items():
        tag = _tag(wl, rate)
        ss = [summaries[i] for i in idx]
        for name, fn, arg in ((f"{tag}_summary.png", summary_bars, ss),
                              (f"{tag}_ttft_cdf.png", ttft_cdf, [results[i] for i in idx]),
                              (f"{tag}_workers.png", worker_load, ss)):
            fn(arg, out_dir / name)
            written.append(out_dir / name)
    for wl in dict.fromkeys(s["workload"] for s in summaries):
        ss = [s for s in summaries if s["workload"] == wl]
        if len({s["rate"] for s in ss}) > 1:
            rate_sweep(ss, out_dir / f"{wl}_rates.png")
            sw = next((x for x in sweeps or [] if x["workload"] == wl), None)
            goodput_vs_rate(ss, out_dir / f"{wl}_goodput.png", sw)
            written += [out_dir / f"{wl}_rates.png", out_dir / f"{wl}_goodput.png"]
    return written
