"""Summaries, TokenLake/stock ratios, the token-for-token check, JSON and markdown.

Definitions (also in docs/bench.md):

* hit rate = sum(cached_tokens) / sum(prompt tokens), cached_tokens from each
  response's ``meta_info`` (TokenLake: including tokens pulled from other workers);
* tokens prefilled = sum(prompt tokens - cached_tokens);
* throughput = completed requests / makespan (first send to last token);
* TBT = a request's mean gap between consecutive tokens after the first (TPOT);
* goodput = requests meeting the SLO (TTFT <= slo_ttft and TBT <= slo_tbt) / makespan; the
  SLO is per workload (``DEFAULT_SLOS``, overridden by ``--slo-ttft`` / ``--slo-tbt``);
* load CV = population stdev / mean across workers of requests served, of tokens
  prefilled and of forward time (SGLang's ``run_batch`` seconds), from each worker's
  ``/metrics`` over the measured phase;
* with ``--cpu-quota``: per worker, the seconds its cgroup was throttled during the
  replay (the budget was the bottleneck) and the share of CFS periods throttled; the CPU
  seconds its processes used (``worker_cpu_s``) and, of those, the pool's own threads
  (``worker_pool_threads_cpu_s``: broker, peer agent, KV stream; the scheduler thread's pool
  work is in the rest);
* with ``--sweep``: peak goodput per configuration and TTFT at half the reference's
  peak (``sweep.analyze``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sglang_tokenlake.bench import sweep
from sglang_tokenlake.bench.runner import ConfigResult

STOCK = ("stock-rr", "stock-cache-aware")


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tbt_s: float


DEFAULT_SLO = SLO(2.0, 0.1)
DEFAULT_SLOS = {"longdoc": SLO(8.0, 0.2)}
"""Per workload (by the name before any ``-``): ``longdoc``'s lone uncached request takes
about 4 s to its first token at 0.45 cores per worker, so its TTFT SLO is twice that, and a
4K-token prefill batched beside a decode stalls it for seconds (no chunked-prefill overlap on
CPU), so its mean TBT SLO is 0.2 s. Every other workload: ``DEFAULT_SLO``."""


def slo_for(workload: str, ttft_s: Optional[float] = None, tbt_s: Optional[float] = None
            ) -> SLO:
    """The SLO of ``workload``: its default, with whichever of ``ttft_s``/``tbt_s`` is given."""
    base = DEFAULT_SLOS.get(workload.split("-")[0], DEFAULT_SLO)
    return SLO(base.ttft_s if ttft_s is None else ttft_s, base.tbt_s if tbt_s is None else tbt_s)


def pct(xs: Sequence[float], q: float) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.percentile(xs, q)) if xs else float("nan")


def cv(xs: Sequence[float]) -> float:
    a = np.asarray(xs, dtype=float)
    if len(a) == 0 or a.mean() == 0:
        return float("nan")
    return float(a.std() / a.mean())


def _r(x: float, n: int = 4) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, n)


def summarize(res: ConfigResult, slo: SLO) -> dict[str, Any]:
    ok = [r for r in res.records if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    if ok:
        start = min(r.sent_s for r in ok)
        makespan = max(r.sent_s + r.e2e_s for r in ok) - start
    else:
        makespan = float("nan")
    mean_tbt = [(sum(r.tbt_s) / len(r.tbt_s)) if r.tbt_s else float("nan") for r in ok]
    good = sum(1 for r, m in zip(ok, mean_tbt)
               if r.ttft_s <= slo.ttft_s and (math.isnan(m) or m <= slo.tbt_s))
    tbts = [x for r in ok for x in r.tbt_s]
    w = res.workers
    prefill_w = [x.get("prompt_tokens", 0) - x.get("cached_tokens", 0) for x in w]
    busy_w = [x.get("run_batch_s", 0.0) for x in w]
    s: dict[str, Any] = {
        "config": res.config, "backend": res.backend, "frontend": res.frontend,
        "workload": res.workload, "rate": res.rate,
        "requests": len(res.records), "completed": len(ok), "failed": len(res.records) - len(ok),
        "prompt_tokens": prompt, "cached_tokens": cached,
        "tokens_prefilled": prompt - cached,
        "hit_rate": _r(cached / prompt if prompt else float("nan")),
        "output_tokens": sum(r.output_tokens for r in ok),
        "makespan_s": _r(makespan, 3),
        "throughput_rps": _r(len(ok) / makespan if makespan > 0 else float("nan")),
        "output_tps": _r(sum(r.output_tokens for r in ok) / makespan if makespan > 0
                         else float("nan"), 2),
        "goodput_rps": _r(good / makespan if makespan > 0 else float("nan")),
        "slo": {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s},
        "slo_attainment": _r(good / len(ok) if ok else float("nan")),
        "ttft_p50_s": _r(pct([r.ttft_s for r in ok], 50)),
        "ttft_p90_s": _r(pct([r.ttft_s for r in ok], 90)),
        "ttft_p99_s": _r(pct([r.ttft_s for r in ok], 99)),
        "ttft_mean_s": _r(float(np.mean([r.ttft_s for r in ok])) if ok else float("nan")),
        # TBT: per request, the mean gap between tokens after the first (TPOT); ITL:
        # every gap pooled (bursty streams deliver several tokens in one read).
        "tbt_p50_s": _r(pct(mean_tbt, 50), 5), "tbt_p99_s": _r(pct(mean_tbt, 99), 5),
        "itl_p99_s": _r(pct(tbts, 99), 5),
        "e2e_p50_s": _r(pct([r.e2e_s for r in ok], 50)),
        "e2e_p99_s": _r(pct([r.e2e_s for r in ok], 99)),
        "worker_requests": [int(x.get("requests", 0)) for x in w],
        "worker_prefill_tokens": [int(p) for p in prefill_w],
        "worker_cached_tokens": [int(x.get("cached_tokens", 0)) for x in w],
        "worker_busy_s": [round(b, 3) for b in busy_w],
        "load_cv_requests": _r(cv([x.get("requests", 0) for x in w])),
        "load_cv_prefill_tokens": _r(cv(prefill_w)),
        "load_cv_busy": _r(cv(busy_w)),
        "busy_s_total": _r(sum(busy_w), 3),
        "startup_s": res.startup_s, "replay_s": res.replay_s,
    }
    if res.frontend_stats:
        s["frontend_stats"] = res.frontend_stats
    if res.cpu:
        s["worker_cpu_throttled_s"] = [
            round(x.get("throttled_time", 0) / 1e9 + x.get("throttled_usec", 0) / 1e6, 3)
            for x in res.cpu]
        s["worker_cpu_throttled_periods"] = [
            _r(x["nr_throttled"] / x["nr_periods"]) if x.get("nr_periods") else None
            for x in res.cpu]
        if any("cpu_usec" in x for x in res.cpu):
            s["worker_cpu_s"] = [round(x.get("cpu_usec", 0) / 1e6, 3) for x in res.cpu]
            s["worker_pool_threads_cpu_s"] = [round(x.get("pool_threads_usec", 0) / 1e6, 3)
                                              for x in res.cpu]
    tl = [x for x in w if any(k.startswith("tl_") for k in x)]
    if tl:
        keys = sorted({k for x in tl for k in x if k.startswith("tl_") and k != "tl_hit_rate"})
        s["tokenlake"] = {k[3:]: _r(sum(x.get(k, 0.0) for x in tl), 3) for k in keys}
        s["worker_tokenlake_hit_tokens"] = [int(x.get("tl_hit_tokens", 0)) for x in tl]
        s["worker_tokenlake_miss_tokens"] = [int(x.get("tl_miss_tokens", 0)) for x in tl]
    c = res.calibration
    if c:
        s["calibration"] = {
            "samples": len(c),
            "prefill_share_uncached": _r(sum(x["ttft_miss_s"] for x in c)
                                         / sum(x["e2e_miss_s"] for x in c)),
            "ttft_miss_s": _r(float(np.mean([x["ttft_miss_s"] for x in c]))),
            "ttft_hit_s": _r(float(np.mean([x["ttft_hit_s"] for x in c]))),
            "e2e_miss_s": _r(float(np.mean([x["e2e_miss_s"] for x in c]))),
            "mean_prompt_tokens": _r(float(np.mean([x["prompt_tokens"] for x in c])), 1),
        }
    return s


def ratios(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """TokenLake / stock for every (TokenLake config, stock config) pair of one workload and rate."""
    by = {s["config"]: s for s in summaries}
    out = []
    keys = ("hit_rate", "tokens_prefilled", "throughput_rps", "goodput_rps", "ttft_p50_s",
            "ttft_p99_s", "e2e_p50_s", "load_cv_requests", "load_cv_prefill_tokens",
            "busy_s_total")
    for t in (c for c in by if c.startswith("tokenlake")):
        for st in (c for c in STOCK if c in by):
            row: dict[str, Any] = {"tokenlake": t, "stock": st}
            for k in keys:
                a, b = by[t].get(k), by[st].get(k)
                row[k] = _r(a / b) if a is not None and b not in (None, 0) else None
            out.append(row)
    return out


def mismatches(results: Sequence[ConfigResult]) -> list[dict[str, Any]]:
    """Requests whose output_ids differ between configurations (reference: the first result)."""
    ref: dict[tuple[str, str], tuple[str, list[int]]] = {}
    out = []
    for res in results:
        for r in res.records:
            if not r.ok:
                continue
            key = (res.workload, r.rid)
            tag = f"{res.config}@{res.rate:g}"
            if key not in ref:
                ref[key] = (tag, r.output_ids)
                continue
            rtag, rids = ref[key]
            if r.output_ids != rids:
                first = next((i for i, (a, b) in enumerate(zip(rids, r.output_ids)) if a != b),
                             min(len(rids), len(r.output_ids)))
                out.append({"workload": res.workload, "rid": r.rid, "reference": rtag,
                            "config": tag, "first_diff": first,
                            "reference_ids": rids[first:first + 8],
                            "got_ids": r.output_ids[first:first + 8]})
    return out


def failures(results: Sequence[ConfigResult]) -> list[dict[str, Any]]:
    return [{"workload": res.workload, "config": res.config, "rate": res.rate, "rid": r.rid,
             "error": r.error} for res in results for r in res.records if not r.ok]


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def markdown(meta: dict[str, Any], summaries: Sequence[dict[str, Any]],
             ratio_rows: Sequence[dict[str, Any]], mism: Sequence[dict[str, Any]],
             fails: Sequence[dict[str, Any]],
             sweeps: Optional[Sequence[dict[str, Any]]] = None) -> str:
    slos = meta["slo"]
    st = meta["settings"]
    L = [f"# Benchmark: TokenLake vs stock SGLang ({meta['settings']['workers']} workers)", "",
         f"Command: `{meta['command']}`", "",
         f"Model `{meta['settings']['model']}` ({meta['settings']['dtype']}), page size "
         f"{meta['settings']['page_size']}, TokenLake segment size "
         f"{meta['settings']['segment_size']}, --max-total-tokens "
         f"{meta['settings']['max_total_tokens']} per worker, device "
         f"{meta['settings']['device'] or 'auto'}. SLO: "
         + "; ".join(f"{wl}: TTFT <= {x['ttft_s']:g} s and mean TBT <= {x['tbt_s']:g} s"
                     for wl, x in slos.items())
         + f". Wall time {meta.get('wall_s', 0):.0f} s.", ""]
    if st.get("cpu_quota"):
        L += [f"CPU budget: {st['cpu_quota']:g} cores per worker process tree "
              f"({st.get('cpu_quota_mechanism') or '?'}"
              + (", whole CPUs by affinity, not a quota" if st.get("cpu_quota_mechanism")
                 == "taskset" else "") + "); the front end and the load generator run "
              "outside every budget.", ""]
    if mism:
        L += [f"**TOKEN MISMATCH: {len(mism)} request(s) differ between configurations** "
              "(see `mismatches` in the JSON).", ""]
    else:
        L += ["Outputs: identical token for token across all configurations.", ""]
    if fails:
        L += [f"**{len(fails)} request(s) failed** (see `failures` in the JSON).", ""]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s["workload"], s["rate"]), []).append(s)
    for (wl, rate), ss in groups.items():
        L += [f"## {wl} at {rate:g} req/s", "",
              "| config | front end | hit rate | tokens prefilled | throughput req/s | goodput req/s "
              "| TTFT p50 s | TTFT p99 s | TBT p50 ms | E2E p50 s | load CV req | load CV prefill "
              "| forward s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: |"]
        for s in ss:
            tbt = s["tbt_p50_s"] * 1000 if s["tbt_p50_s"] is not None else None
            L.append(f"| {s['config']} | {s['frontend']} | {_fmt(s['hit_rate'])} | "
                     f"{s['tokens_prefilled']} | {_fmt(s['throughput_rps'])} | "
                     f"{_fmt(s['goodput_rps'])} | {_fmt(s['ttft_p50_s'])} | "
                     f"{_fmt(s['ttft_p99_s'])} | {_fmt(tbt, '.1f')} | {_fmt(s['e2e_p50_s'])} | "
                     f"{_fmt(s['load_cv_requests'])} | {_fmt(s['load_cv_prefill_tokens'])} | "
                     f"{_fmt(s['busy_s_total'], '.1f')} |")
        L += ["", "Per worker (requests / tokens prefilled / cached tokens):", ""]
        for s in ss:
            L.append(f"- {s['config']}: requests {s['worker_requests']}, prefilled "
                     f"{s['worker_prefill_tokens']}, cached {s['worker_cached_tokens']}"
                     + (f", TokenLake hit tokens {s['worker_tokenlake_hit_tokens']}"
                        if "worker_tokenlake_hit_tokens" in s else "")
                     + (f", CPU throttled s {s['worker_cpu_throttled_s']}"
                        if "worker_cpu_throttled_s" in s else "")
                     + (f", CPU s {s['worker_cpu_s']} (pool threads "
                        f"{s['worker_pool_threads_cpu_s']})" if "worker_cpu_s" in s else ""))
        rr = [r for r in ratio_rows if (r["wl"], r["rate"]) == (wl, rate)]
        if rr:
            L += ["", "Ratios TokenLake / stock (hit rate and throughput: higher is better; "
                  "prefilled, TTFT, CV: lower is better):", "",
                  "| TokenLake | vs stock | hit rate | tokens prefilled | throughput | goodput "
                  "| TTFT p50 | TTFT p99 | load CV req |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for r in rr:
                L.append(f"| {r['tokenlake']} | {r['stock']} | {_fmt(r['hit_rate'], '.2f')} | "
                         f"{_fmt(r['tokens_prefilled'], '.2f')} | "
                         f"{_fmt(r['throughput_rps'], '.2f')} | {_fmt(r['goodput_rps'], '.2f')} "
                         f"| {_fmt(r['ttft_p50_s'], '.2f')} | {_fmt(r['ttft_p99_s'], '.2f')} | "
                         f"{_fmt(r['load_cv_requests'], '.2f')} |")
        cal = [s for s in ss if "calibration" in s]
        if cal:
            c = cal[0]["calibration"]
            L += ["", f"Prefill share (lone uncached requests of this workload on an idle worker, "
                  f"{c['samples']} samples, {cal[0]['config']}): TTFT {c['ttft_miss_s']:.3f} s of "
                  f"E2E {c['e2e_miss_s']:.3f} s = **{100 * c['prefill_share_uncached']:.0f}%**; "
                  f"with the prefix cached TTFT is {c['ttft_hit_s']:.3f} s."]
        L.append("")
    if sweeps:
        L += sweep.markdown(sweeps)
    if mism:
        L += ["## Mismatches", "", "| workload | rid | reference | config | first diff |",
              "| --- | --- | --- | --- | ---: |"]
        L += [f"| {m['workload']} | {m['rid']} | {m['reference']} | {m['config']} | "
              f"{m['first_diff']} |" for m in mism[:50]]
        L.append("")
    return "\n".join(L)


def write(out_dir: Path, meta: dict[str, Any], results: Sequence[ConfigResult],
          slos: Mapping[str, SLO]) -> dict[str, Any]:
    """bench.json, bench.md, requests.jsonl in ``out_dir``; returns the JSON document.
    ``slos``: each workload's SLO, by workload name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(r, slos[r.workload]) for r in results]
    ratio_rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s["workload"], s["rate"]), []).append(s)
    for (wl, rate), ss in groups.items():
        ratio_rows += [{"wl": wl, "rate": rate, **r} for r in ratios(ss)]
    mism, fails = mismatches(results), failures(results)
    doc = {"meta": {**meta, "slo": {wl: {"ttft_s": x.ttft_s, "tbt_s": x.tbt_s}
                                    for wl, x in slos.items()}},
           "summaries": summaries, "ratios": ratio_rows, "mismatches": mism,
           "failures": fails[:200], "failed_requests": len(fails),
           "sweep": sweep.analyze(summaries, meta["sweep"]["target_attainment"])
           if meta.get("sweep") else None,
           "calibration": [{"config": r.config, "workload": r.workload, "rate": r.rate,
                            "samples": r.calibration} for r in results]}
    (out_dir / "bench.json").write_text(json.dumps(doc, indent=1))
    (out_dir / "bench.md").write_text(markdown(doc["meta"], summaries, ratio_rows, mism, fails,
                                               doc["sweep"]))
    with (out_dir / "requests.jsonl").open("w") as f:
        for res in results:
            for r in res.records:
                f.write(json.dumps({"config": res.config, "workload": res.workload,
                                    "rate": res.rate, **r.to_json()}) + "\n")
    return doc
