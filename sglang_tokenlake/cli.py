"""``tokenlake``: command-line tools of a TokenLake pool.

    tokenlake status --addr 127.0.0.1:31000 [--addr ...]   # workers' caches, members, counters
    tokenlake keygen DIR --name w0 --member HOST:PORT      # a worker's CURVE key pair
    tokenlake keygen DIR --name ops                        # a key that may read status only
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional


def _endpoint(addr: str) -> str:
    return addr if "://" in addr else f"tcp://{addr}"


def client_for(addr: str, curve_dir: Optional[str] = None,
               curve_key: Optional[str] = None) -> Any:
    from sglang_tokenlake.transport.auth import load_curve_keys
    from sglang_tokenlake.transport.client import Client

    return Client(_endpoint(addr), curve=load_curve_keys(curve_dir, curve_key))


def fetch_status(addr: str, timeout: float = 5.0, curve_dir: Optional[str] = None,
                 keys: bool = False, curve_key: Optional[str] = None) -> dict[str, Any]:
    with client_for(addr, curve_dir, curve_key) as c:
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
        failed = {k: v for k, v in c.items()
                  if k.startswith(("pull_", "lease_", "leases_")) and v and k not in moved}
        if failed:  # e.g. pull_not_found: evicted at the owner since it was announced
            print(f"        failures: {failed}")
        leases = p.get("leases")
        if leases:
            print(f"        leases: granted to {leases['granted_to']} held at {leases['held_at']} "
                  f"unleases waiting={leases['unleases_waiting']}")
        cal = p.get("calibration")
        if cal:
            links = {peer: (f"rtt={1e3 * x['rtt_s']:.2f}ms ship={1e3 * x['ship_rtt_s']:.2f}ms "
                             f"bw={x['bandwidth_Bps'] / 1e6:.0f}MB/s")
                     for peer, x in cal["links"].items()}
            print(f"        time model: prefill={1e3 * cal['prefill_s_per_token']:.3f}ms/token "
                  f"({cal['prefill_source']}) links={links}")


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
    ps.add_argument("--curve-dir", default=None,
                    help="the pool's certificates, when the pool uses CURVE")
    ps.add_argument("--curve-key", default=None,
                    help="secret key to use: a name in --curve-dir or a path (default: the "
                         "first status-only key there)")
    pk = sub.add_parser("keygen", help="create one CURVE key pair in DIR (DIR/NAME.key, "
                                       "DIR/NAME.key_secret)")
    pk.add_argument("dir")
    pk.add_argument("--name", required=True, help="file name of the pair, e.g. w0 or ops")
    pk.add_argument("--member", default=None,
                    help="broker address HOST:PORT of the worker the key speaks for (omit for "
                         "a key that may only read status)")
    a = p.parse_args(argv)
    if a.cmd == "keygen":
        from sglang_tokenlake.transport.auth import keygen

        try:
            pub, sec = keygen(a.dir, a.name, a.member)
        except (ValueError, FileExistsError) as e:
            print(f"keygen: {e}", file=sys.stderr)
            return 2
        print(f"wrote {pub} (copy it into every worker's --tokenlake-curve-dir) and {sec} "
              f"(keep it on {'that worker' if a.member else 'the host that reads status'} only)")
        return 0
    if a.cmd == "status":
        rc = 0
        out = []
        for addr in a.addr:
            try:
                st = fetch_status(addr, a.timeout, a.curve_dir, keys=a.keys or len(a.addr) > 1,
                                  curve_key=a.curve_key)
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
