"""``tokenlake``: command-line tools of a TokenLake pool.

    tokenlake status --addr 127.0.0.1:31000 [--addr ...]   # workers' caches, members, counters
    tokenlake keygen DIR                                   # CURVE keys for --tokenlake-curve-dir
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional


def _endpoint(addr: str) -> str:
    return addr if "://" in addr else f"tcp://{addr}"


def client_for(addr: str, curve_dir: Optional[str] = None) -> Any:
    from sglang_tokenlake.transport.auth import load_curve_keys
    from sglang_tokenlake.transport.client import Client

    return Client(_endpoint(addr), curve=load_curve_keys(curve_dir))


def fetch_status(addr: str, timeout: float = 5.0, curve_dir: Optional[str] = None,
                 keys: bool = False) -> dict[str, Any]:
    with client_for(addr, curve_dir) as c:
        return c.request("status", {"keys": keys}, timeout=timeout).header


def _print_status(st: dict[str, Any]) -> None:
    m, s = st["memory"], st["stats"]
    print(f"worker {st['worker']}  segment_size={st['segment_size']}  page_size={st['page_size']}")
    print(f"  segments: local={st['local_segments']} known={st['known_segments']}")
    print(
        f"  memory (tokens): capacity={m['capacity']} free={m['free']} cached={m['cached']} "
        f"(locked={m['locked']} evictable={m['evictable']}) held_by_requests={m['held_by_requests']}"
    )
    print(
        f"  requests={s['requests']} hit_tokens={s['hit_tokens']} miss_tokens={s['miss_tokens']} "
        f"hit_rate={100 * s['hit_rate']:.1f}% evicted_segments={s['evicted_segments']}"
    )
    p = st.get("pool")
    if p:
        alive = [m["id"] + ("*" if m["self"] else "") for m in p["members"] if m["alive"]]
        dead = [m["id"] for m in p["members"] if not m["alive"]]
        print(f"  pool: members alive={alive} dead={dead}")
        print(f"        segments designated={p['designated_segments']} "
              f"transient={p['transient_segments']} known elsewhere={p['remote_segments_by_owner']}")
        c = p["counters"]
        moved = {k: v for k, v in c.items() if k.endswith("_bytes") or k.endswith("_segments")}
        print(f"        moved: {moved}")


def _print_pool_summary(statuses: list[dict[str, Any]]) -> None:
    """Pool-wide view: each designated segment should be held by exactly one worker."""
    per_worker = {st["worker"]: st.get("designated_keys", []) for st in statuses}
    all_keys = [k for ks in per_worker.values() for k in ks]
    distinct = len(set(all_keys))
    print(f"pool: {len(statuses)} workers, {distinct} distinct segments, "
          f"{len(all_keys)} designated copies ({len(all_keys) - distinct} replicas)")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tokenlake", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("status", help="show the cache of one or more workers")
    ps.add_argument("--addr", action="append", required=True,
                    help="HOST:PORT of a worker's TokenLake broker (--port + 1000 by default); repeatable")
    ps.add_argument("--json", action="store_true", help="print raw JSON")
    ps.add_argument("--keys", action="store_true",
                    help="also list each worker's designated segment keys (pool-wide dedup view)")
    ps.add_argument("--timeout", type=float, default=5.0)
    ps.add_argument("--curve-dir", default=None, help="pool keys, when the pool uses CURVE")
    pk = sub.add_parser("keygen", help="create the pool's CURVE keys in DIR")
    pk.add_argument("dir")
    a = p.parse_args(argv)
    if a.cmd == "keygen":
        from sglang_tokenlake.transport.auth import keygen

        pub, sec = keygen(a.dir)
        print(f"wrote {pub} and {sec}; start every worker with --tokenlake-curve-dir {a.dir}")
        return 0
    if a.cmd == "status":
        rc = 0
        out = []
        for addr in a.addr:
            try:
                st = fetch_status(addr, a.timeout, a.curve_dir, keys=a.keys or len(a.addr) > 1)
            except Exception as e:
                print(f"{addr}: {type(e).__name__}: {e}", file=sys.stderr)
                rc = 1
                continue
            out.append(st)
            if not a.json:
                _print_status(st)
        if a.json:
            print(json.dumps(out if len(out) != 1 else out[0], indent=2))
        elif len(out) > 1:
            _print_pool_summary(out)
        return rc
    return 2


if __name__ == "__main__":
    sys.exit(main())
