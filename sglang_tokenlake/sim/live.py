"""Live against simulated: replay a harness run's exact workload in the simulator.

``python -m sglang_tokenlake.sim.live results/bench`` reads the harness's
``bench.json`` (workers, ``--max-total-tokens``, segment size, each workload's
generator parameters and seed, the rates) and ``requests.jsonl`` (the outputs of
multi-turn sessions, which later prompts contain), rebuilds the very requests
the harness sent (same token ids, same arrival times), and runs the simulator's
policy for each measured configuration on them:

    stock-rr                 -> stock        (per-worker LRU, round robin)
    stock-cache-aware        -> cache_aware  (sglang-router 0.3.2's rule)
    tokenlake-rr             -> tokenlake    (PoolPolicy; executor round robin)
    tokenlake-p2c            -> tokenlake    (PoolPolicy; executor power of two choices)
    tokenlake-cache-aware    -> tokenlake    (PoolPolicy; executor cache_aware, pool bounds)
    tokenlake-least-load     -> tokenlake    (PoolPolicy; executor the proxy's least_load:
                                              fewest requests in flight, prefix ties)
    tokenlake-bounded        -> tokenlake    (PoolPolicy; executor the proxy's bounded_load)
    stock-bounded            -> stock_bounded (per-worker radix, the proxy's bounded_load)

The cache-aware rules take the thresholds the run's router had: 0.3.2's defaults,
then the configuration's own flags (the pool bounds for ``tokenlake-cache-aware``),
then the run's ``--router-args``. Each worker's cache holds ``max_total_tokens``;
compute times are calibrated from the harness's own lone-request measurements (TTFT
per prompt token, decode seconds per step). Memory as in SGLang: a running request holds its output and the
part of its prompt outside its worker's cache (``SimConfig.shared_prefix_kv``); a
prefix is usable once the prefill that computes it has finished, and a request's hit
is decided when it starts (``SimConfig.prefill_visibility``); the stock workers' caches are
SGLang's radix tree: whole nodes evicted, a node ending at each 4,096-token prefill chunk,
running prefixes locked (``SimConfig.radix_nodes``, ``sim/radix.py``), matched when a
request starts, as SGLang does at admission (``SimConfig.match_at_admission``). It prints
the simulated against the measured hit rate and load CV (requests per worker) per
configuration, and request by request how many replayed hits agree with the live ones
(``per_request``), and writes ``sim_vs_live.json`` beside the run.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import shlex
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import xxhash

from sglang_tokenlake.bench.proxy import LOAD_FACTOR
from sglang_tokenlake.segments import request_namespace, segment_keys
from sglang_tokenlake.sim.compute import ComputeModel
from sglang_tokenlake.sim.engine import simulate
from sglang_tokenlake.sim.model import SimConfig
from sglang_tokenlake.sim.routing import CacheAwareConfig
from sglang_tokenlake.sim.workloads import Request, Workload

if TYPE_CHECKING:
    from sglang_tokenlake.config import TokenLakeConfig

POLICY_OF = {"stock-rr": "stock", "stock-cache-aware": "cache_aware",
             "tokenlake-rr": "tokenlake", "tokenlake-p2c": "tokenlake",
             "tokenlake-cache-aware": "tokenlake", "tokenlake-least-load": "tokenlake",
             "tokenlake-bounded": "tokenlake", "stock-bounded": "stock_bounded"}
EXECUTOR_OF = {"tokenlake-rr": "round_robin", "tokenlake-p2c": "power_of_two",
               "tokenlake-cache-aware": "cache_aware", "tokenlake-least-load": "least_inflight",
               "tokenlake-bounded": "bounded_load"}
_SEED = request_namespace("tokenlake-live-replay")


def _cv(xs: list[float]) -> float:
    m = sum(xs) / len(xs) if xs else 0.0
    if m <= 0:
        return 0.0
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) / m


class Replay(NamedTuple):
    """One workload of a harness run as the simulator replays it."""

    workload: Workload
    chars_per_token: float
    """Mean characters per token of the prompts as the router sees them (ids joined by spaces)."""
    rids: list[str]
    """The harness's request id of each of ``workload.requests``."""


def replay_requests(meta_wl: dict[str, Any], records: dict[str, dict[str, Any]],
                    segment_size: int) -> Replay:
    """The harness's requests of one workload as simulator requests (``Replay``)."""
    from sglang_tokenlake.bench.workloads import GENERATORS, build, full_prompt

    params = dict(meta_wl["params"])
    seed, rate = int(params.pop("seed", 0)), float(params.pop("rate"))
    gen = GENERATORS.get(meta_wl["name"].split("-")[0])
    if gen is not None:  # the summary also records derived figures: keep the arguments
        accepted = inspect.signature(gen).parameters
        params = {k: v for k, v in params.items() if k in accepted}
    wl = build(meta_wl["name"], params, seed=seed)
    if meta_wl.get("requests") is not None:  # the harness's --requests cut the list so
        wl.requests = wl.requests[: int(meta_wl["requests"])]
    wl = wl.at_rate(rate)
    done: dict[str, tuple[list[int], list[int]]] = {}
    out: list[Request] = []
    chars = tokens = 0
    for r in wl.requests:
        prompt = full_prompt(r, done)
        rec = records.get(r.rid)
        if rec is not None:
            done[r.rid] = (prompt, list(rec.get("output_ids") or []))
        keys = segment_keys(prompt, segment_size, _SEED)
        if len(prompt) % segment_size:  # the tail block: never shared
            keys.append(xxhash.xxh3_64_intdigest(repr(prompt).encode()))
        out.append(Request(r.arrival_s, len(prompt), r.max_new_tokens, tuple(keys)))
        chars += sum(len(str(t)) + 1 for t in prompt)
        tokens += len(prompt)
    return Replay(Workload(meta_wl["name"], segment_size, out), chars / max(tokens, 1),
                  [r.rid for r in wl.requests])


def per_request(rids: list[str], simulated: list[int], measured: dict[str, dict[str, Any]],
                segment_size: int, executors: Optional[list[int]] = None) -> dict[str, Any]:
    """Request by request, the replay's hit tokens against the live ones (``measured``:
    rid -> the run's record, requests that failed left out): how many agree within one
    segment, and the sum of the differences over the prompt tokens (a hit rate's units,
    without the cancelling of the aggregate's). Where the records name the worker that
    ran them (TokenLake's request log), also how many ran where the replay ran them
    (``executors``: the replay's, in ``rids`` order)."""
    diff = tokens = matched = n = 0
    pairs: list[tuple[int, int]] = []  # (replay's worker, live worker)
    for j, (rid, sim) in enumerate(zip(rids, simulated)):
        rec = measured.get(rid)
        if rec is None or rec.get("error"):
            continue
        d = abs(int(rec["cached_tokens"]) - sim)
        n, matched = n + 1, matched + (d < segment_size)
        diff, tokens = diff + d, tokens + int(rec["prompt_tokens"])
        if executors is not None and rec.get("worker") is not None:
            pairs.append((executors[j], int(rec["worker"])))
    return {"requests_compared": n, "requests_matched": matched,
            "per_request_diff": round(diff / tokens, 4) if tokens else None,
            **({"executors_compared": len(pairs), "executors_matched": same_worker(pairs)}
               if pairs else {})}


def same_worker(pairs: list[tuple[int, int]]) -> int:
    """Of ``(replayed worker, live worker)`` pairs, how many ran together, under the naming
    of the replay's workers after the live ones that agrees most often: which worker a
    router picks for the first request of a prefix (a tie) is its own choice, and
    worker 0 of the replay need not be worker 0 of the run. Every naming is tried up to 8
    workers; beyond, the most frequent pairs are matched greedily."""
    counts: dict[tuple[int, int], int] = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    sims = sorted({a for a, _ in pairs})
    lives = sorted({b for _, b in pairs} | set(range(len(sims))))
    if len(sims) <= 8 and len(lives) <= 8:
        return max(sum(counts.get((a, b), 0) for a, b in zip(sims, perm))
                   for perm in itertools.permutations(lives, len(sims)))
    used_a: set[int] = set()
    used_b: set[int] = set()
    total = 0
    for (a, b), c in sorted(counts.items(), key=lambda kv: -kv[1]):
        if a not in used_a and b not in used_b:
            used_a.add(a)
            used_b.add(b)
            total += c
    return total


def pool_config_of(settings: dict[str, Any]) -> TokenLakeConfig:
    """The TokenLake settings the run's workers had (defaults plus its --tokenlake-args)."""
    from sglang_tokenlake.config import TokenLakeConfig

    parser = argparse.ArgumentParser(add_help=False)
    TokenLakeConfig.add_cli_args(parser)
    args, _ = parser.parse_known_args([str(a) for a in settings.get("tokenlake_args") or []])
    return TokenLakeConfig.from_cli_args(args)



def router_of(config: str, settings: dict[str, Any]) -> CacheAwareConfig:
    """The cache-aware rule in front of ``config`` in the run: sglang-router 0.3.2's
    defaults, then the configuration's own front-end flags, then the run's
    ``--router-args`` (as the harness passes them to the router)."""
    from sglang_tokenlake.bench.runner import CONFIGS

    cfg = CONFIGS[config]
    flags = [*cfg.frontend_args, *(settings.get("router_args") or [])]
    return CacheAwareConfig().with_flags(flags if cfg.frontend.startswith("router") else [])


def calibrated(calibration: list[dict[str, Any]], kv_tokens: int) -> ComputeModel:
    """Compute constants from the harness's lone-request samples (cache misses)."""
    per_token, per_step = [], []
    for c in calibration:
        for s in c.get("samples", []):
            if s.get("prompt_tokens") and s.get("ttft_miss_s"):
                per_token.append(s["ttft_miss_s"] / s["prompt_tokens"])
            if s.get("output_tokens", 0) > 1 and s.get("e2e_miss_s"):
                per_step.append((s["e2e_miss_s"] - s["ttft_miss_s"]) / (s["output_tokens"] - 1))
    if not per_token or not per_step:
        raise ValueError("bench.json has no calibration samples (the run had --calibration "
                         "0): rerun the harness with --calibration N, N > 0")
    return ComputeModel(prefill_s_per_token=statistics.median(per_token), attn_s_per_token_pair=0.0,
                        decode_step_s=statistics.median(per_step), decode_s_per_ctx_token=0.0,
                        kv_capacity_tokens=kv_tokens)


def schedule_policy_of(settings: dict[str, Any]) -> str:
    """The ``--schedule-policy`` the run's workers had (SGLang's default ``fcfs``; parsed as
    SGLang parses it, as ``pool_config_of`` does the TokenLake flags), ``+priority`` added
    with ``--enable-priority-scheduling``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--schedule-policy", default="fcfs")
    parser.add_argument("--enable-priority-scheduling", action="store_true")
    argv = [*(settings.get("extra_args") or []), *(settings.get("tokenlake_args") or [])]
    args, _ = parser.parse_known_args([str(a) for a in argv])
    return args.schedule_policy + ("+priority" if args.enable_priority_scheduling else "")


def compare(run_dir: Path, tokenlake_args: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Replay every measured configuration of ``run_dir``; ``tokenlake_args`` come after
    the run's own ``--tokenlake-args`` (a setting whose default has changed since).
    A run whose workers reordered their queues is refused (ValueError): the replay's
    workers serve theirs in arrival order."""
    bench = json.loads((run_dir / "bench.json").read_text())
    settings = dict(bench["meta"]["settings"])
    policy = schedule_policy_of(settings)
    if policy != "fcfs":
        raise ValueError(f"the run's workers had --schedule-policy {policy}; the replay serves "
                         f"each worker's queue in arrival order (fcfs) and cannot predict it")
    settings["tokenlake_args"] = [*(settings.get("tokenlake_args") or []), *tokenlake_args]
    S, workers = int(settings["segment_size"]), int(settings["workers"])
    kv = int(settings["max_total_tokens"])
    records: dict[tuple[str, str], dict[str, Any]] = {}  # any configuration's: the outputs
    measured: dict[tuple[str, float, str], dict[str, dict[str, Any]]] = {}
    req_file = run_dir / "requests.jsonl"
    if req_file.exists():
        for line in req_file.read_text().splitlines():
            r = json.loads(line)
            records[(r["workload"], r["rid"])] = r
            measured.setdefault((r["workload"], float(r["rate"]), r["config"]), {})[r["rid"]] = r
    compute = calibrated(bench.get("calibration", []), kv)
    rows = []
    for meta_wl in bench["meta"]["workloads"]:
        name = meta_wl["name"]
        recs = {rid: r for (w, rid), r in records.items() if w == name}
        workload, cpt, rids = replay_requests(meta_wl, recs, S)
        pool = pool_config_of(settings)
        cfg = SimConfig(workers, kv // S, S, compute=compute, chars_per_token=cpt,
                        policy=pool.policy(), shared_prefix_kv=True, prefill_visibility=True,
                        radix_nodes=True, match_at_admission=True,
                        spill_window_s=pool.heartbeat_interval,
                        load_factor=float(settings.get("load_factor", LOAD_FACTOR)))
        sims: dict[str, Any] = {}
        rate = float(meta_wl["params"]["rate"])
        for s in bench["summaries"]:  # this workload at this rate (a sweep has several)
            if s["workload"] != name or s["rate"] != rate or s["config"] not in POLICY_OF:
                continue
            pol = POLICY_OF[s["config"]]
            ex = EXECUTOR_OF.get(s["config"], SimConfig.tokenlake_executor)
            router = router_of(s["config"], settings)  # used by the cache-aware rules only
            key = (pol, ex, router)
            if key not in sims:
                sims[key] = simulate(workload, pol, replace(
                    cfg, tokenlake_executor=ex, router=router, tokenlake_router=router))
            res = sims[key]
            live_last = (s.get("tokenlake") or {}).get("evicted_last_copies")
            sim_hit = res.hit_rate
            rows.append({
                "workload": name, "rate": s["rate"], "config": s["config"], "policy": pol,
                "measured_hit_rate": round(s["hit_rate"], 4), "simulated_hit_rate": round(sim_hit, 4),
                "hit_rate_diff": round(sim_hit - s["hit_rate"], 4),
                "measured_load_cv": round(s["load_cv_requests"], 4),
                "simulated_load_cv": round(_cv([float(x) for x in res.served]), 4),
                **({"router_flags": list(router.threshold_flags())}
                   if "cache_aware" in (pol, ex) else {}),
                **({"simulated_spilled_segments": res.extra["spilled_segments"]}
                   if "spilled_segments" in res.extra else {}),
                **({"measured_evicted_last_copies": int(live_last),
                    "simulated_evicted_last_copies": res.extra["evicted_last_copies"]}
                   if live_last is not None and "evicted_last_copies" in res.extra else {}),
                **(per_request(rids, res.hits, measured[(name, rate, s["config"])], S,
                               res.executors)
                   if (name, rate, s["config"]) in measured else {}),
            })
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_tokenlake.sim.live", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a harness output folder (bench.json, requests.jsonl)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write the JSON (default: RUN/sim_vs_live.json)")
    ap.add_argument("--tokenlake-args", type=shlex.split, default=[],
                    help="TokenLake flags added after the run's own, e.g. "
                         "--tokenlake-args=\"--tokenlake-spill-margin 2\" for a run made while "
                         "that was the default")
    args = ap.parse_args(argv)
    if not (args.run / "bench.json").exists():
        print(f"error: {args.run / 'bench.json'} not found: give a harness output folder",
              file=sys.stderr)
        return 2
    try:
        rows = compare(args.run, tuple(args.tokenlake_args))
    except SystemExit:  # a flag argparse refused: it said why
        return 2
    except ValueError as e:  # a malformed TokenLake flag (it names itself), or no samples
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| workload | rate | config | hit rate live | sim | diff | requests matched "
          "| per-request diff | load CV live | sim |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        matched = (f"{r['requests_matched']} / {r['requests_compared']}"
                   if "requests_compared" in r else "–")
        if "executors_compared" in r:
            matched += f" (same worker {r['executors_matched']} / {r['executors_compared']})"
        prd = r.get("per_request_diff")
        print(f"| {r['workload']} | {r['rate']:g} | {r['config']} | {r['measured_hit_rate']:.3f} "
              f"| {r['simulated_hit_rate']:.3f} | {r['hit_rate_diff']:+.3f} | {matched} "
              f"| {'–' if prd is None else f'{prd:.3f}'} "
              f"| {r['measured_load_cv']:.3f} | {r['simulated_load_cv']:.3f} |")
    out = args.out or args.run / "sim_vs_live.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
