#!/usr/bin/env python3
"""Time match_prefix and insert: TokenLakeCache versus SGLang's stock radix caches.

Same token sequences (1K..32K tokens) for every cache, in one run:
  * radix      - sglang.srt.mem_cache.radix_cache.RadixCache (Python tree)
  * unified    - UnifiedRadixCache, SGLang's default (Rust tree core)
  * tokenlake  - TokenLakeCache, segment size = page size and segment size 256

insert: a fresh sequence of n tokens (its slots) into a warm cache.
match:  match_prefix of a cached n-token sequence followed by one new token.
Prints a table with the ratio tokenlake / stock and writes JSON.

    python scripts/bench_cache_ops.py [--out results/cache_ops.json] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from cache_harness import make_pools  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402

from sglang_tokenlake.config import TokenLakeConfig  # noqa: E402
from sglang_tokenlake.sglang.cache import TokenLakeCache  # noqa: E402

LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]


def build(kind: str, page: int, segment: int):
    params, _, _ = make_pools(8, page, rows=2, max_ctx=8)
    if kind == "radix":
        return RadixCache(params)
    if kind == "unified":
        from sglang.srt.mem_cache.unified_cache.components import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

        params.tree_components = (ComponentType.FULL,)
        return UnifiedRadixCache(params)
    return TokenLakeCache(params, TokenLakeConfig(segment_size=segment), model_id="bench")


def time_ops(cache, n: int, reps: int, rng: random.Random) -> dict[str, float]:
    value = torch.arange(1, n + 1, dtype=torch.int64)
    # Warm the cache with other sequences so the tree is not trivially small.
    for _ in range(4):
        toks = array("q", (rng.randrange(1, 50000) for _ in range(n)))
        cache.insert(InsertParams(key=RadixKey(toks), value=value))
    ins, mat = [], []
    for _ in range(reps):
        toks = array("q", (rng.randrange(1, 50000) for _ in range(n)))
        key = RadixKey(toks)
        t0 = time.perf_counter()
        cache.insert(InsertParams(key=key, value=value))
        ins.append(time.perf_counter() - t0)
        probe = RadixKey(toks + array("q", [7]))
        t0 = time.perf_counter()
        m = cache.match_prefix(MatchPrefixParams(key=probe))
        mat.append(time.perf_counter() - t0)
        assert m.device_prefix_len == n, (type(cache).__name__, m.device_prefix_len, n)
    return {"insert_us": 1e6 * statistics.median(ins), "match_us": 1e6 * statistics.median(mat)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "results" / "cache_ops.json"))
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--page-size", type=int, default=16)
    a = p.parse_args()
    page = a.page_size
    configs = [
        ("radix", page, page),
        ("unified", page, page),
        ("tokenlake", page, page),
        ("tokenlake", page, 256),
    ]
    rows = []
    for n in LENGTHS:
        row = {"tokens": n}
        for kind, pg, seg in configs:
            name = kind if kind != "tokenlake" else f"tokenlake_s{seg}"
            rng = random.Random(n)
            row[name] = time_ops(build(kind, pg, seg), n, a.reps, rng)
        rows.append(row)
    names = [k if k != "tokenlake" else f"tokenlake_s{s}" for k, _, s in configs]
    print(f"page size {page}; median over {a.reps} ops; microseconds")
    for op in ("match_us", "insert_us"):
        print(f"\n{op[:-3]:>8} " + " ".join(f"{n:>16}" for n in names)
              + f"   ratio s{page}/radix  s{page}/unified  s256/unified")
        for row in rows:
            vals = [row[n][op] for n in names]
            r1 = row[f"tokenlake_s{page}"][op] / row["radix"][op]
            r2 = row[f"tokenlake_s{page}"][op] / row["unified"][op]
            r3 = row["tokenlake_s256"][op] / row["unified"][op]
            print(f"{row['tokens']:>8} " + " ".join(f"{v:>16.1f}" for v in vals)
                  + f"   {r1:>14.2f} {r2:>12.2f} {r3:>13.2f}")
    out = {
        "benchmark": "cache_ops",
        "page_size": page,
        "reps": a.reps,
        "machine": {"python": platform.python_version(), "processor": platform.processor(),
                    "torch": torch.__version__},
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
