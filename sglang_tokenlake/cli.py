"""``tokenlake``: command-line tools of a TokenLake pool.

    tokenlake status --addr 127.0.0.1:31000     # one worker's cache, memory and counters
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional


def _endpoint(addr: str) -> str:
    return addr if "://" in addr else f"tcp://{addr}"


def fetch_status(addr: str, timeout: float = 5.0) -> dict[str, Any]:
    from sglang_tokenlake.transport.client import Client

    with Client(_endpoint(addr)) as c:
        return c.request("status", timeout=timeout).header


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


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tokenlake", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("status", help="show the cache of one or more workers")
    ps.add_argument("--addr", action="append", required=True,
                    help="HOST:PORT of a worker's TokenLake broker (--port + 1000 by default); repeatable")
    ps.add_argument("--json", action="store_true", help="print raw JSON")
    ps.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    if a.cmd == "status":
        rc = 0
        out = []
        for addr in a.addr:
            try:
                st = fetch_status(addr, a.timeout)
            except Exception as e:
                print(f"{addr}: {type(e).__name__}: {e}", file=sys.stderr)
                rc = 1
                continue
            out.append(st)
            if not a.json:
                _print_status(st)
        if a.json:
            print(json.dumps(out if len(out) != 1 else out[0], indent=2))
        return rc
    return 2


if __name__ == "__main__":
    sys.exit(main())
