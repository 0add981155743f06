"""Rate sweeps that reach saturation, and what they are read for.

``--sweep`` runs every configuration at increasing request rates (geometric steps from
the first rate, or the listed ``--rates``) and stops after the first rate at which even
the best configuration meets the SLO for fewer than ``target`` (90%) of its requests.
Read per workload:

* every configuration's **peak goodput** (req/s meeting the SLO) and the rate it came at;
* the **reference** configuration's peak (the cache-aware router when it ran, else the
  first stock configuration, else the first one), and each configuration's **TTFT p50
  at half that peak**: at the measured rate nearest to half the peak, which the report
  names (a sweep measures only its own steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

TARGET = 0.9
REFERENCES = ("stock-cache-aware", "stock-rr")


def geometric(start: float, factor: float, steps: int, max_rate: Optional[float] = None
              ) -> list[float]:
    """``start, start*factor, ...``: ``steps`` rates, none above ``max_rate``."""
    if not start > 0:
        raise ValueError(f"the sweep's first rate must be positive, got {start}")
    if not factor > 1:
        raise ValueError(f"--sweep-factor must be above 1, got {factor}")
    if steps < 1:
        raise ValueError(f"--sweep-steps must be at least 1, got {steps}")
    out = [round(start * factor ** i, 4) for i in range(steps)]
    return [r for r in out if max_rate is None or r <= max_rate + 1e-9] or [start]


def best_attainment(summaries: Sequence[dict[str, Any]]) -> float:
    """The highest SLO attainment among one step's configurations (0 if none completed)."""
    vals = [s.get("slo_attainment") for s in summaries]
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return max(vals, default=0.0)


def saturated(summaries: Sequence[dict[str, Any]], target: float = TARGET) -> bool:
    return best_attainment(summaries) < target


def reference(configs: Sequence[str]) -> Optional[str]:
    for name in REFERENCES:
        if name in configs:
            return name
    return configs[0] if configs else None


def analyze(summaries: Sequence[dict[str, Any]], target: float = TARGET) -> list[dict[str, Any]]:
    """Per workload: rates run, whether it saturated, peaks, TTFT at half the reference peak."""
    out = []
    for wl in dict.fromkeys(s["workload"] for s in summaries):
        ss = [s for s in summaries if s["workload"] == wl]
        rates = sorted({s["rate"] for s in ss})
        configs = list(dict.fromkeys(s["config"] for s in ss))
        by = {(s["config"], s["rate"]): s for s in ss}
        steps = [{"rate": r, "best_attainment": round(best_attainment(
            [s for s in ss if s["rate"] == r]), 4)} for r in rates]
        peaks = {}
        for c in configs:
            pts = [(by[(c, r)].get("goodput_rps"), r) for r in rates if (c, r) in by]
            pts = [(g, r) for g, r in pts if g is not None and not math.isnan(g)]
            g, r = max(pts, default=(None, None))
            peaks[c] = {"peak_goodput_rps": g, "peak_rate": r}
        ref = reference(configs)
        ref_peak = peaks[ref]["peak_goodput_rps"] if ref else None
        half = ref_peak / 2 if ref_peak else None
        nearest = min(rates, key=lambda r: (abs(r - half), r)) if half else None
        rows = []
        for c in configs:
            at = by.get((c, nearest)) if nearest is not None else None
            rows.append({"config": c, **peaks[c],
                         "ttft_p50_at_half_s": at.get("ttft_p50_s") if at else None,
                         "ttft_p99_at_half_s": at.get("ttft_p99_s") if at else None})
        out.append({"workload": wl, "target_attainment": target, "rates": rates, "steps": steps,
                    "saturated": bool(steps) and steps[-1]["best_attainment"] < target,
                    "reference": ref, "reference_peak_goodput_rps": ref_peak,
                    "half_reference_peak_rps": None if half is None else round(half, 4),
                    "nearest_rate": nearest, "configs": rows})
    return out


def markdown(analyses: Sequence[dict[str, Any]]) -> list[str]:
    """The report's sweep section (lines)."""
    def f(x: Any, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)

    L: list[str] = []
    for a in analyses:
        steps = ", ".join(f"{s['rate']:g} ({100 * s['best_attainment']:.0f}%)" for s in a["steps"])
        L += [f"## Sweep: {a['workload']}", "",
              f"Rates (best configuration's SLO attainment): {steps}. "
              + (f"Saturated: the best configuration met the SLO for fewer than "
                 f"{100 * a['target_attainment']:.0f}% of requests at the last rate."
                 if a["saturated"] else
                 "**Not saturated**: raise the rates (`--rates`, `--sweep-steps`)."), ""]
        if a["nearest_rate"] is not None:
            L += [f"Reference: {a['reference']}, peak goodput "
                  f"{f(a['reference_peak_goodput_rps'])} req/s; half of it is "
                  f"{f(a['half_reference_peak_rps'])} req/s, TTFT read at the nearest measured "
                  f"rate, **{a['nearest_rate']:g} req/s**.", ""]
        L += ["| config | peak goodput req/s | at rate | TTFT p50 at half the reference peak s "
              "| TTFT p99 there s |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in a["configs"]:
            L.append(f"| {r['config']} | {f(r['peak_goodput_rps'])} | {f(r['peak_rate'], 'g')} | "
                     f"{f(r['ttft_p50_at_half_s'])} | {f(r['ttft_p99_at_half_s'])} |")
        L.append("")
    return L
