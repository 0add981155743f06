"""Benchmark TokenLake against stock SGLang on real workers, with real front ends.

    python -m sglang_tokenlake.bench --workers 3 --workload docs --out results/bench

For every workload and rate, each configuration runs on freshly started workers
(same model, flags, page size and --max-total-tokens; stopped before the next starts):

  stock-rr              --cache-backend radix, sglang-router --policy round_robin
  stock-cache-aware     --cache-backend radix, sglang-router --policy cache_aware
  tokenlake-rr          --cache-backend tokenlake, one pool, sglang-router --policy round_robin
  tokenlake-p2c         --cache-backend tokenlake, one pool, sglang-router --policy power_of_two
  tokenlake-cache-aware --cache-backend tokenlake, one pool, sglang-router --policy cache_aware
                        balanced within 2 requests in flight (CacheAwareConfig.pool())
  tokenlake-least-load  --cache-backend tokenlake, one pool, fewest in-flight requests (the
                        harness's proxy: the router has no such policy)
  tokenlake-bounded     --cache-backend tokenlake, one pool, the proxy's bounded_load: each
  stock-bounded         prefix on its homes, every worker's requests in flight bounded
                        (--cache-backend radix for stock-bounded; both on request only)

--cpu-quota CORES gives every worker's process tree its own CPU budget (a cgroup
quota), so workers are independent compute like GPUs. --sweep raises the rate until
the best configuration meets the SLO for fewer than 90% of requests.

The identical request sequence (same prompts, same arrival times) goes to each;
outputs are compared token for token (greedy, float32). Writes bench.json, bench.md,
requests.jsonl and PNG plots to --out. Exit status 1 on a token mismatch or a failed
request (unless --allow-mismatch / --allow-failures), 130 on Ctrl-C; every process
started is stopped in all cases.
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import requests

from sglang_tokenlake.bench import cpuquota, report, runner, sweep, workloads
from sglang_tokenlake.bench.proxy import LOAD_FACTOR
from sglang_tokenlake.bench.runner import CONFIGS, DEFAULT_CONFIGS, ClusterSettings

DEFAULT_RATES = {"docs": 3.0, "longdoc": 0.5, "chat": 2.0, "gsp": 3.0, "mooncake": 2.0}


def _value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sglang_tokenlake.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and workers")
    g.add_argument("--model", default=None,
                   help="model path; default: build the offline tiny model of --model-size")
    g.add_argument("--model-size", default="small", choices=["tiny", "small", "medium"],
                   help="tiny-model builder size when --model is not given (default small)")
    g.add_argument("--model-dir", default=None, help="where to build it (models/bench-SIZE)")
    g.add_argument("--workers", type=int, default=3, help="SGLang workers per configuration")
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--segment-size", type=int, default=64, help="--tokenlake-segment-size")
    g.add_argument("--max-total-tokens", type=int, default=12288,
                   help="KV capacity per worker in tokens (same for every configuration)")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--worker-args", default="", help="more launch_server flags, one string (write --worker-args=\"--flag value\")")
    g.add_argument("--tokenlake-args", default="", help="more flags for TokenLake workers (--tokenlake-args=\"...\")")
    g.add_argument("--router-args", default="",
                   help="more sglang-router flags for every configuration behind the router, "
                        "after the configuration's own (--router-args=\"...\")")
    g.add_argument("--load-factor", type=float, default=LOAD_FACTOR,
                   help="tokenlake-bounded / stock-bounded: a worker takes a request of a "
                        "prefix it homes while its requests in flight stay within this many "
                        "times the mean (>= 1; default %(default)s)")
    g.add_argument("--rr-frontend", choices=["router", "proxy"], default="router",
                   help="round-robin front end: sglang-router (default) or the harness's proxy")
    g.add_argument("--cpu-quota", type=float, default=None, metavar="CORES",
                   help="CPU budget of every worker's process tree, in cores (a cgroup CPU "
                        "quota; v1 cpu controller, else v2, else taskset with a warning); "
                        "torch threads set to match; front end and load generator outside")
    g.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS),
                   help="configurations to run (default: all but tokenlake-bounded and "
                        "stock-bounded)")
    g.add_argument("--startup-timeout", type=float, default=300.0)
    w = p.add_argument_group("workload")
    w.add_argument("--workload", nargs="+", default=["docs"],
                   help="docs, longdoc, chat, gsp, mooncake (conversation trace), "
                        "mooncake-synthetic, or mooncake-PATH.jsonl (default docs); longdoc "
                        "has 2x --workers contexts of 3-6K tokens: use --max-total-tokens "
                        f"{workloads.LONGDOC_MAX_TOTAL_TOKENS}")
    w.add_argument("--rates", nargs="+", type=float, default=None,
                   help="request rates (req/s), each a fresh run; default per workload "
                        f"{DEFAULT_RATES}")
    w.add_argument("--sweep", action="store_true",
                   help="raise the rate (from the first --rates value, times --sweep-factor; "
                        "or through the listed --rates) until the best configuration's SLO "
                        "attainment drops below --sweep-target")
    w.add_argument("--sweep-factor", type=float, default=1.5, help="rate step of a sweep")
    w.add_argument("--sweep-steps", type=int, default=8, help="most rates a sweep runs")
    w.add_argument("--sweep-max-rate", type=float, default=None, help="highest rate a sweep runs")
    w.add_argument("--sweep-target", type=float, default=sweep.TARGET,
                   help="SLO attainment below which the sweep stops (default 0.9)")
    w.add_argument("--requests", type=int, default=None, help="keep the first N requests")
    w.add_argument("--workload-arg", action="append", default=[], metavar="WL.KEY=VALUE",
                   help="generator parameter, e.g. docs.documents=30 (repeatable)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--warmup", type=int, default=4, help="warm-up requests per worker")
    w.add_argument("--calibration", type=int, default=3,
                   help="workload prompts timed alone for the prefill share (0: skip)")
    w.add_argument("--request-timeout", type=float, default=600.0)
    w.add_argument("--retries", type=int, default=1,
                   help="re-run a configuration whose worker was killed or crashed (default 1)")
    o = p.add_argument_group("results")
    o.add_argument("--slo-ttft", type=float, default=None,
                   help="goodput SLO on TTFT (s); default per workload: 8 for longdoc, else 2")
    o.add_argument("--slo-tbt", type=float, default=None,
                   help="goodput SLO on mean TBT (s); default per workload: 0.2 for longdoc, "
                        "else 0.1")
    o.add_argument("--out", default="out/bench", help="output directory")
    o.add_argument("--log-dir", default=None, help="server logs (default OUT/logs)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--allow-mismatch", action="store_true")
    o.add_argument("--allow-failures", action="store_true")
    o.add_argument("--dry-run", action="store_true", help="print the workloads and exit")
    a = p.parse_args(argv)
    if not a.load_factor >= 1.0:  # NaN too
        p.error(f"--load-factor must be >= 1, got {a.load_factor}")
    return a


def rate_steps(a: argparse.Namespace, wl: workloads.BenchWorkload) -> list[float]:
    """The rates a workload runs at: --rates (or its default), or a sweep's ladder."""
    base = a.rates or [DEFAULT_RATES.get(wl.name.split("-")[0], 2.0)]
    if not a.sweep:
        return base
    if len(base) > 1:
        return sorted(base)
    return sweep.geometric(base[0], a.sweep_factor, a.sweep_steps, a.sweep_max_rate)


def check_fit(wls: list[workloads.BenchWorkload], max_total_tokens: int) -> None:
    """Every first-turn request must fit a worker's KV (SGLang rejects it otherwise)."""
    for wl in wls:
        worst = max((len(r.input_ids) + r.max_new_tokens for r in wl.requests
                     if r.parent is None), default=0)
        if worst >= max_total_tokens:
            raise SystemExit(f"{wl.name}: a request needs {worst} tokens (prompt + output), "
                             f"more than --max-total-tokens {max_total_tokens} per worker; "
                             "raise --max-total-tokens or shorten the workload")


def build_workloads(a: argparse.Namespace) -> list[workloads.BenchWorkload]:
    over: dict[str, dict[str, Any]] = {}
    for item in a.workload_arg:
        key, _, val = item.partition("=")
        wl, _, k = key.partition(".")
        if not k or not _:
            raise SystemExit(f"--workload-arg wants WL.KEY=VALUE, got {item!r}")
        over.setdefault(wl, {})[k] = _value(val)
    out = []
    for name in a.workload:
        base = "mooncake" if name.startswith("mooncake") else name
        kw = {**over.get(base, {}), **over.get(name, {})}
        if base == "longdoc":
            kw.setdefault("contexts", 2 * a.workers)
        w = workloads.build(name, kw, seed=a.seed)
        if a.requests is not None:
            w.requests = w.requests[: a.requests]
        out.append(w)
    return out


def _install_signals() -> None:
    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)
    atexit.register(runner.stop_all)


def _banner(lines: list[str]) -> None:
    bar = "!" * 78
    print("\n".join([bar, *[f"!! {x}" for x in lines], bar]), file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    wls = build_workloads(a)
    check_fit(wls, a.max_total_tokens)
    ladders = {wl.name: rate_steps(a, wl) for wl in wls}
    for wl in wls:
        print(f"workload {json.dumps(wl.at_rate(ladders[wl.name][0]).summary())}", flush=True)
        if a.sweep:
            print(f"sweep {wl.name}: rates {ladders[wl.name]} until the best configuration's "
                  f"SLO attainment < {a.sweep_target:g}", flush=True)
    n_runs = sum(len(x) for x in ladders.values()) * len(a.configs)
    print(f"configurations: {', '.join(a.configs)}; {'up to ' if a.sweep else ''}{n_runs} runs "
          f"of {a.workers} workers", flush=True)
    mech = None
    if a.cpu_quota is not None:
        try:
            cpuquota.quota_us(a.cpu_quota)
            mech = cpuquota.detect()
        except (ValueError, cpuquota.CpuQuotaError) as e:
            raise SystemExit(str(e)) from None
        print(f"CPU budget: {a.cpu_quota:g} cores per worker by {mech.describe()}; front end "
              "and load generator outside", flush=True)
        if mech.kind == "taskset":
            _banner(["--cpu-quota: no writable cgroup; falling back to taskset CPU affinity "
                     "(whole CPUs shared round robin, NOT a quota):", mech.note])
    if a.dry_run:
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_root = Path(a.log_dir) if a.log_dir else out / "logs"
    model = a.model
    if model is None:
        from sglang_tokenlake.tiny_model import TinyModelSpec, build

        mdir = a.model_dir or f"models/bench-{a.model_size}"
        model = str(build(TinyModelSpec(size=a.model_size, dtype=a.dtype), mdir))
        print(f"model: tiny-model builder, size {a.model_size}, at {model}", flush=True)
    settings = ClusterSettings(
        model=model, workers=a.workers, page_size=a.page_size, segment_size=a.segment_size,
        max_total_tokens=a.max_total_tokens, dtype=a.dtype, device=a.device,
        extra_args=shlex.split(a.worker_args), tokenlake_args=shlex.split(a.tokenlake_args),
        router_args=shlex.split(a.router_args), rr_frontend=a.rr_frontend,
        load_factor=a.load_factor,
        startup_timeout=a.startup_timeout, request_timeout=a.request_timeout,
        warmup_requests=a.warmup, calibration_requests=a.calibration, cpu_quota=a.cpu_quota,
        cpu_quota_mechanism=mech.kind if mech else "",
        cpu_quota_root=str(mech.root or "") if mech else "")
    slos = {wl.name: report.slo_for(wl.name, a.slo_ttft, a.slo_tbt) for wl in wls}
    _install_signals()
    t0 = time.monotonic()
    results: list[runner.ConfigResult] = []
    plan: list[tuple[workloads.BenchWorkload, float]] = []  # what ran
    interrupted, error = False, ""
    try:
        for wl in wls:
            for rate in ladders[wl.name]:
                run_wl = wl.at_rate(rate)
                plan.append((wl, rate))
                step = []
                for name in a.configs:
                    step.append(_run_with_retries(name, settings, run_wl, log_root,
                                                  a.no_progress, a.retries))
                    results.append(step[-1])
                if a.sweep:
                    best = sweep.best_attainment([report.summarize(r, slos[wl.name]) for r in step])
                    print(f"sweep {wl.name} at {rate:g} req/s: best SLO attainment "
                          f"{100 * best:.0f}%", flush=True)
                    if best < a.sweep_target:
                        print(f"sweep {wl.name}: saturated at {rate:g} req/s", flush=True)
                        break
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every process started", file=sys.stderr, flush=True)
    except (RuntimeError, TimeoutError, OSError, requests.RequestException) as e:
        error = f"{type(e).__name__}: {e}"
        _banner(["the benchmark stopped on an error (every process it started is stopped):",
                 *error.splitlines()])
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip clean-up
        runner.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not results:
        return 130 if interrupted else 1
    if error:
        print("writing the results of the configurations that finished", flush=True)
    meta = {"command": "python -m sglang_tokenlake.bench " + " ".join(
                shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
            "settings": {**{k: v for k, v in vars(settings).items()}, "model_size": a.model_size
                         if a.model is None else None},
            "workloads": [wl.at_rate(r).summary() for wl, r in plan],
            "host": {"machine": platform.machine(), "python": platform.python_version(),
                     "cpus": _cpus()},
            "sweep": {"target_attainment": a.sweep_target, "factor": a.sweep_factor,
                      "steps": a.sweep_steps, "max_rate": a.sweep_max_rate,
                      "ladders": ladders} if a.sweep else None,
            "cpu_quota": {"cores": a.cpu_quota, "mechanism": mech.describe(),
                          "quota_us": cpuquota.quota_us(a.cpu_quota)
                          if mech.kind != "taskset" else None,
                          "period_us": cpuquota.PERIOD_US if mech.kind != "taskset" else None,
                          "threads": cpuquota.threads_for(a.cpu_quota),
                          "outside": ["front end", "load generator"]} if mech else None,
            "wall_s": round(time.monotonic() - t0, 1), "interrupted": interrupted,
            "error": error, "git": _git_state()}
    doc = report.write(out, meta, results, slos)
    if not a.no_plots:
        from sglang_tokenlake.bench import plots

        plots.write_all(out, results, doc["summaries"], doc["sweep"])
    print((out / "bench.md").read_text(), flush=True)
    print(f"wrote {out}/bench.json, bench.md, requests.jsonl"
          + ("" if a.no_plots else " and PNG plots"), flush=True)
    rc = 130 if interrupted else (1 if error else 0)
    if doc["mismatches"]:
        _banner([f"TOKEN MISMATCH: {len(doc['mismatches'])} request(s) produced different "
                 "output_ids across configurations (greedy, float32):",
                 *[f"{m['workload']} {m['rid']}: {m['reference']} vs {m['config']} from token "
                   f"{m['first_diff']}: {m['reference_ids']} != {m['got_ids']}"
                   for m in doc["mismatches"][:20]]])
        if not a.allow_mismatch:
            rc = rc or 1
    if doc["failed_requests"]:
        _banner([f"{doc['failed_requests']} request(s) FAILED:",
                 *[f"{f['config']} {f['rid']}: {f['error']}" for f in doc["failures"][:10]]])
        if not a.allow_failures:
            rc = rc or 1
    return rc


def _git_state() -> str:
    """Commit of the checkout the harness runs from (``+dirty`` with local changes)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=10).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _run_with_retries(name: str, s: ClusterSettings, wl: workloads.BenchWorkload,
                      log_root: Path, no_progress: bool, retries: int) -> runner.ConfigResult:
    for attempt in range(retries + 1):
        try:
            return _run_one(name, s, wl, log_root, no_progress)
        except runner.WorkerLost as e:
            if attempt == retries:
                raise
            _banner([f"[{name}] a process stopped during the run; retrying the configuration "
                     f"on fresh workers ({attempt + 1}/{retries}):", *str(e).splitlines()[:8]])
    raise AssertionError("unreachable")


def _run_one(name: str, s: ClusterSettings, wl: workloads.BenchWorkload, log_root: Path,
             no_progress: bool) -> runner.ConfigResult:
    cfg = CONFIGS[name]
    log_dir = log_root / f"{wl.name}-r{wl.params.get('rate', 0):g}-{name}"
    bar: Any = None
    failed = [0]

    def on_replay() -> None:
        nonlocal bar
        if not no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(wl.requests), desc=f"{wl.name} {name}", unit="req",
                       dynamic_ncols=True, leave=True)

    def on_done(rec: Any) -> None:
        if not rec.ok:
            failed[0] += 1
        if bar is not None:
            bar.update(1)
            if failed[0]:
                bar.set_postfix(failed=failed[0])
            if bar.n >= bar.total:
                bar.close()

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        res = runner.run_config(cfg, s, wl, log_dir, on_done, say, on_replay)
    finally:
        if bar is not None:
            bar.close()
    sm = report.summarize(res, report.SLO(float("inf"), float("inf")))
    print(f"[{name}] {sm['completed']}/{sm['requests']} ok, hit rate {sm['hit_rate']}, "
          f"prefilled {sm['tokens_prefilled']}, {sm['throughput_rps']} req/s, TTFT p50 "
          f"{sm['ttft_p50_s']} s p99 {sm['ttft_p99_s']} s, load CV {sm['load_cv_requests']}",
          flush=True)
    return res


if __name__ == "__main__":
    sys.exit(main())
