"""The main job: TokenLake at work on a shared-prefix workload.

    python -m sglang_tokenlake.demo [--workers N] [--segment-size S]

1. builds the tiny model from code (models/tiny, float32; nothing downloaded);
2. starts workers with ``--cache-backend tokenlake`` joined in one pool
   (``--tokenlake-peers``; ``--workers 1`` is a pool of one);
3. sends requests that share long documents, round-robin over the workers, and
   prints for each the prompt length, the tokens served from the pool (computed
   on another worker: pulled or attended remotely) and the first generated tokens;
4. prints ``tokenlake status`` of every worker (members, segments, memory, bytes
   moved, hit counters) and the pool-wide view, then stops every process it started.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Optional

import requests

from sglang_tokenlake.cli import _print_pool_summary, _print_status, fetch_status
from sglang_tokenlake.cluster import PoolSpec, start_workers, stop_workers, wait_pool
from sglang_tokenlake.tiny_model import TinyModelSpec, build


def _generate(url: str, ids: list[int], n: int) -> dict:
    r = requests.post(url + "/generate", json={
        "input_ids": ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True},
    }, timeout=300)
    r.raise_for_status()
    return r.json()


def _pool_tokens(w) -> int:
    st = fetch_status(w.broker_addr)["stats"]
    return int(st["pulled_tokens"] + st["shipped_tokens"])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_tokenlake.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=3, help="workers in the pool (default 3)")
    p.add_argument("--remote-mode", default="auto", choices=["auto", "ship", "pull"],
                   help="--tokenlake-remote-mode of the workers")
    p.add_argument("--segment-size", type=int, default=64, help="--tokenlake-segment-size")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--model-dir", default="models/tiny")
    p.add_argument("--documents", type=int, default=3)
    p.add_argument("--questions", type=int, default=4, help="questions per document")
    p.add_argument("--doc-tokens", type=int, default=1000)
    p.add_argument("--log-dir", default="out/demo-logs")
    a = p.parse_args(argv)

    print(f"== building the tiny model in {a.model_dir}")
    model = str(build(TinyModelSpec(size="tiny", dtype="float32"), a.model_dir))
    pool = PoolSpec.pick(a.workers)
    specs = pool.worker_specs(model, extra_args=["--tokenlake-remote-mode", a.remote_mode],
                              page_size=a.page_size, segment_size=a.segment_size,
                              max_total_tokens=16384)
    print(f"== starting {a.workers} worker(s) with --cache-backend tokenlake "
          f"--tokenlake-segment-size {a.segment_size} (logs in {a.log_dir})")
    t0 = time.monotonic()
    workers = start_workers(specs, a.log_dir)
    try:
        print(f"   ready in {time.monotonic() - t0:.0f}s: " + ", ".join(w.url for w in workers))
        wait_pool(workers)  # heartbeats: the members find each other
        rng = random.Random(0)
        docs = [[rng.randrange(3, 1024) for _ in range(a.doc_tokens)] for _ in range(a.documents)]
        print(f"\n== {a.documents} documents x {a.questions} questions; each document visits "
              "the workers in turn")
        print("   cached = prompt tokens not recomputed; via pool = of those, KV held by another")
        print("   worker (its queries were shipped there, or its KV pulled here)")
        print(f"{'req':>4} {'doc':>4} {'worker':>8} {'prompt':>7} {'cached':>7} {'via pool':>9}"
              "  first output tokens")
        total_prompt = total_cached = total_pool = 0
        i = 0
        for q in range(a.questions):
            for d, doc in enumerate(docs):
                w = workers[(q + d) % len(workers)]
                ids = doc + [rng.randrange(3, 1024) for _ in range(rng.randint(5, 30))]
                before = _pool_tokens(w)
                out = _generate(w.url, ids, 8)
                via_pool = _pool_tokens(w) - before
                cached = out["meta_info"]["cached_tokens"]
                total_prompt += len(ids)
                total_cached += cached
                total_pool += via_pool
                print(f"{i:>4} {d:>4} {w.spec.port:>8} {len(ids):>7} {cached:>7} {via_pool:>9}"
                      f"  {out['output_ids'][:6]}")
                i += 1
        print(f"\n   prompt tokens {total_prompt}, served from the cache {total_cached} "
              f"({100.0 * total_cached / total_prompt:.1f}%), of which held by another worker "
              f"{total_pool}")
        print("\n== tokenlake status")
        statuses = [fetch_status(w.broker_addr, keys=True) for w in workers]
        for st in statuses:
            _print_status(st)
        if len(statuses) > 1:
            _print_pool_summary(statuses)
    finally:
        stop_workers(workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
