"""Per-worker counters before and after the measured phase (differences are what it did).

Every worker runs with ``--enable-metrics``; from its Prometheus ``/metrics`` the
harness reads requests, prompt / cached / generated tokens and the scheduler's
``run_batch`` wall time (time spent in forward passes, prefill and decode). TokenLake
workers also answer ``tokenlake status`` (hit/miss tokens, pool traffic).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional

import requests

# Prometheus series -> our name. Summed over all label sets of the series unless a
# label filter is given.
SERIES: dict[str, tuple[str, dict[str, str]]] = {
    "requests": ("sglang:num_requests_total", {}),
    "prompt_tokens": ("sglang:prompt_tokens_total", {}),
    "cached_tokens": ("sglang:cached_tokens_total", {}),
    "generation_tokens": ("sglang:generation_tokens_total", {}),
    "run_batch_s": ("sglang:scheduler_stage_seconds_total", {"category": "run_batch"}),
    "idle_s": ("sglang:scheduler_idle_seconds_total", {}),
}
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
        except ValueError:
            continue
    return out


def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Our counters of one worker (missing series read as 0)."""
    series = parse_prometheus(requests.get(url + "/metrics", timeout=timeout).text)
    out: dict[str, float] = {}
    for name, (prom, want) in SERIES.items():
        out[name] = sum(v for labels, v in series.get(prom, [])
                        if all(labels.get(k) == x for k, x in want.items()))
    return out


def tokenlake_status(broker_addr: str) -> Optional[dict[str, Any]]:
    from sglang_tokenlake.cli import fetch_status

    try:
        return fetch_status(broker_addr, timeout=10)
    except Exception:
        return None


def tokenlake_counters(st: Optional[dict[str, Any]]) -> dict[str, float]:
    """The flat numeric counters of a ``tokenlake status`` answer (stats + pool counters)."""
    if not st:
        return {}
    out = {f"tl_{k}": float(v) for k, v in (st.get("stats") or {}).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    pool = st.get("pool") or {}
    out.update({f"tl_{k}": float(v) for k, v in (pool.get("counters") or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for k in ("local_segments", "known_segments"):
        if isinstance(st.get(k), (int, float)):
            out[f"tl_{k}"] = float(st[k])
    return out


def snapshot(urls: Sequence[str], brokers: Sequence[Optional[str]]) -> list[dict[str, float]]:
    snaps = []
    for url, broker in zip(urls, brokers):
        c = scrape(url)
        if broker:
            c.update(tokenlake_counters(tokenlake_status(broker)))
        snaps.append(c)
    return snaps


def diff(after: Sequence[dict[str, float]], before: Sequence[dict[str, float]]
         ) -> list[dict[str, float]]:
    """Per worker: after - before for every counter (gauges like segment counts: after)."""
    out = []
    for a, b in zip(after, before):
        d = {}
        for k, v in a.items():
            gauge = k in ("tl_local_segments", "tl_known_segments", "tl_hit_rate")
            d[k] = round(v if gauge else v - b.get(k, 0.0), 6)
        out.append(d)
    return out
