#!/usr/bin/env python3
"""Ship queries or pull KV? Bytes moved per request by mode, and the end-to-end effect.

For each --tokenlake-remote-mode (ship, pull, auto) a fresh 3-worker pool is
started (no transient copies, so every request meets a remote prefix again).
Per workload, documents are computed on worker 0 (their segments spread over
the pool by placement), then requests sharing them run on worker 2. Measured
per request from the workers' counters: query + partial-output bytes (ship),
KV bytes (pull), and the client's end-to-end latency. ``auto`` must pick the
mode that moves fewer bytes (the dispatch rule); the table shows what it chose.

Workloads (token counts at the default tiny model):
  long-prefix/short-output:  prefix 2048 tokens, 16 new, 4 output
  short-prefix/long-output:  prefix 256 tokens, 16 new, 192 output

    python scripts/bench_remote_modes.py [--model models/tiny] [--out results/remote_modes.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from sglang_tokenlake.cli import fetch_status  # noqa: E402
from sglang_tokenlake.cluster import (  # noqa: E402
    PoolSpec,
    start_workers,
    stop_workers,
    wait_pool,
)
from sglang_tokenlake.tiny_model import TinyModelSpec, build  # noqa: E402

WORKLOADS = {
    "long-prefix/short-output": {"prefix": 2048, "new": 16, "output": 4},
    "short-prefix/long-output": {"prefix": 256, "new": 16, "output": 192},
}
BYTE_KEYS = ("query_bytes", "partial_bytes", "pulled_bytes")


def generate(url: str, ids: list[int], n: int) -> dict:
    r = requests.post(url + "/generate", json={
        "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": n,
                                              "ignore_eos": True}}, timeout=600)
    r.raise_for_status()
    return r.json()


def counters(w) -> dict:
    return fetch_status(w.broker_addr, timeout=30)["pool"]["counters"]


def run_mode(mode: str, model: str, seg: int, reqs_per_doc: int, docs: int, log_dir: str) -> dict:
    args = ["--no-tokenlake-transient-copies", "--tokenlake-remote-mode", mode,
            "--tokenlake-log-interval", "0"]
    specs = PoolSpec.pick(3).worker_specs(model, extra_args=args, page_size=16,
                                          segment_size=seg, max_total_tokens=32768)
    workers = start_workers(specs, f"{log_dir}/{mode}")
    out = {}
    try:
        wait_pool(workers)
        for name, wl in WORKLOADS.items():
            rng = random.Random(hash(name) & 0xFFFF)
            rows = []
            for _ in range(docs):
                doc = [rng.randrange(3, 1024) for _ in range(wl["prefix"])]
                generate(workers[0].url, doc, 1)
                time.sleep(0.3)
                for _ in range(reqs_per_doc):
                    ids = doc + [rng.randrange(3, 1024) for _ in range(wl["new"])]
                    before = [counters(w) for w in workers]
                    t0 = time.perf_counter()
                    res = generate(workers[2].url, ids, wl["output"])
                    dt = time.perf_counter() - t0
                    time.sleep(0.2)
                    after = [counters(w) for w in workers]
                    d = {k: after[2].get(k, 0) - before[2].get(k, 0) for k in BYTE_KEYS}
                    planned = {m: after[2].get(f"planned_{m}_segments", 0)
                               - before[2].get(f"planned_{m}_segments", 0)
                               for m in ("ship_query", "pull_kv", "recompute", "local")}
                    rows.append({"latency_s": dt, "cached": res["meta_info"]["cached_tokens"],
                                 "ship_bytes": d["query_bytes"] + d["partial_bytes"],
                                 "pull_bytes": d["pulled_bytes"], "planned": planned,
                                 "output_ids": res["output_ids"]})
            out[name] = {
                "requests": len(rows),
                "ship_bytes_per_request": statistics.mean(r["ship_bytes"] for r in rows),
                "pull_bytes_per_request": statistics.mean(r["pull_bytes"] for r in rows),
                "bytes_per_request": statistics.mean(r["ship_bytes"] + r["pull_bytes"] for r in rows),
                "latency_p50_s": statistics.median(r["latency_s"] for r in rows),
                "cached_tokens_mean": statistics.mean(r["cached"] for r in rows),
                "planned": {m: sum(r["planned"][m] for r in rows) for m in rows[0]["planned"]},
                "outputs": [r["output_ids"] for r in rows],
            }
    finally:
        stop_workers(workers)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: build the tiny model)")
    p.add_argument("--segment-size", type=int, default=64)
    p.add_argument("--docs", type=int, default=2)
    p.add_argument("--requests-per-doc", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results" / "remote_modes.json"))
    p.add_argument("--log-dir", default="out/bench-remote-modes")
    a = p.parse_args()
    model = a.model or str(build(TinyModelSpec(size="tiny", dtype="float32"), "models/tiny"))
    results = {m: run_mode(m, model, a.segment_size, a.requests_per_doc, a.docs, a.log_dir)
               for m in ("ship", "pull", "auto")}
    mismatch = [w for w in WORKLOADS
                if not results["ship"][w]["outputs"] == results["pull"][w]["outputs"]
                == results["auto"][w]["outputs"]]
    print(f"{'workload':<26} {'mode':<5} {'bytes/req':>11} {'ship B':>10} {'pull B':>10} "
          f"{'p50 s':>7} {'cached':>7}  auto planned")
    for w in WORKLOADS:
        for m in ("ship", "pull", "auto"):
            r = results[m][w]
            plan = r["planned"] if m == "auto" else ""
            print(f"{w:<26} {m:<5} {r['bytes_per_request']:>11.0f} {r['ship_bytes_per_request']:>10.0f} "
                  f"{r['pull_bytes_per_request']:>10.0f} {r['latency_p50_s']:>7.3f} "
                  f"{r['cached_tokens_mean']:>7.0f}  {plan}")
        cheaper = min(("ship", "pull"), key=lambda m: results[m][w]["bytes_per_request"])
        auto_b = results["auto"][w]["bytes_per_request"]
        print(f"{'':<26} cheaper: {cheaper}; auto moved {auto_b:.0f} B/request "
              f"({auto_b / results[cheaper][w]['bytes_per_request']:.2f}x the cheaper mode)")
    if mismatch:
        print(f"\n!!! OUTPUT MISMATCH between modes in: {mismatch} !!!")
    for m in results.values():
        for w in m.values():
            w.pop("outputs")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "remote_modes", "workloads": WORKLOADS,
                                       "segment_size": a.segment_size, "results": results,
                                       "output_mismatch": mismatch}, indent=2))
    print(f"wrote {a.out}")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
