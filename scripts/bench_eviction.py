"""Micro-benchmark: microseconds per evicted segment of ``SegmentTree.evict``, lru vs aware.

A tree of ``--nodes`` local segments in prefix chains (64 shared roots, one-off tails),
then ``evict`` calls of ``--batch`` segments each, refilled between calls, as a worker
under memory pressure does. Times are CPU seconds of this process (``time.process_time``,
so other load on a shared machine does not move them). Writes JSON (``--out``).

    python scripts/bench_eviction.py --out results/bench_eviction.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from sglang_tokenlake.segments import namespace_seed, segment_bytes, segment_keys
from sglang_tokenlake.tree import SegmentTree

S = 16


def _request(rng: random.Random, roots: int, depth: int, serial: int) -> list[int]:
    root = rng.randrange(roots) if rng.random() < 0.8 else roots + serial
    return [root] * S * rng.randint(1, 4) + [serial] * S * rng.randint(1, depth)


def run(eviction: str, nodes: int, batch: int, calls: int, seed: int) -> dict:
    rng = random.Random(seed)
    ns = namespace_seed("bench")
    t = SegmentTree(S, eviction)
    serial = 0

    def fill(target: int) -> None:
        nonlocal serial
        while t.local_nodes < target:
            serial += 1
            toks = _request(rng, 64, 12, serial)
            keys, raw = segment_keys(toks, S, ns), segment_bytes(toks, S)
            t.match(keys, raw)
            t.insert(keys, raw, list(range(len(keys))))

    fill(nodes)
    evicted, spent = 0, 0.0
    for _ in range(calls):
        t0 = time.process_time()
        evicted += len(t.evict(batch * S))
        spent += time.process_time() - t0
        fill(nodes)
    return {"eviction": eviction, "nodes": nodes, "batch_segments": batch, "calls": calls,
            "evicted": evicted, "us_per_evicted_segment": round(1e6 * spent / max(evicted, 1), 2),
            "us_per_call": round(1e6 * spent / calls, 1),
            "evictable_leaves_at_end": len(t._leaves)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 128],
                   help="segments freed per evict call")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = [run(e, n, b, args.calls, args.seed)
            for n in args.nodes for b in args.batch for e in ("lru", "aware")]
    doc = {"command": "python scripts/bench_eviction.py " + " ".join(argv or sys.argv[1:]),
           "segment_size": S, "runs": rows}
    for r in rows:
        print(json.dumps(r))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
