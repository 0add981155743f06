#!/usr/bin/env python3
"""Transport benchmark: TokenLake broker versus the bare alternatives, in one run.

1. KV pulls: a client pulls payloads of a segment's size from a server, several
   requests in flight. TokenLake's pull path: PeerAgent ``request(bulk=True)``
   over the owner's KV stream (transport/stream.py: plain TCP, the reply read on
   the requesting thread), as a pool without CURVE pulls. Also the ZeroMQ path
   (PeerAgent -> Broker "get": a pool with CURVE, or before the stream is known).
   Baseline: raw loopback TCP with the same sizes and the same request/response
   pattern, one request at a time. "gather": the server gathers the KV from a KV
   pool (kvio.gather) per request, as a worker serving a pull does.
2. RPC round trip: a small request and its reply, p50/p99. TokenLake: Client ->
   Broker "ping" (the CLI's path), PeerAgent -> Broker "ping" (the pool's path
   between workers for heartbeats, pulls and leases: the caller hands the request
   to the agent thread and waits on a future) and the same with ``direct=True``
   (a forward pass's shipped queries: sent and received on the caller's thread).
   Baseline: bare ZeroMQ REQ/REP with a 64-byte message. The direct path is the
   pool's synchronous requests: shipped queries and leases.

Each measurement runs in 5 interleaved rounds; the JSON has medians (KV: the
median of the per-round ratios, with their range).

Servers run in their own processes. Prints a table with ratios, writes JSON.

    python scripts/bench_transport.py [--out results/transport.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
ROUNDS = 5


# -- servers (separate processes) ---------------------------------------------------------


def _tcp_server(port_q: mp.Queue, sizes: list[int]) -> None:
    payloads = {s: bytes(s) for s in sizes}
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            hdr = _recv_exact(conn, 8)
            if not hdr:
                break
            (size,) = struct.unpack("<Q", hdr)
            if size == 0:
                break
            conn.sendall(struct.pack("<Q", size))
            conn.sendall(payloads[size])
        conn.close()


def _recv_exact(conn: socket.socket, n: int, buf: bytearray | None = None) -> bytes | bytearray:
    out = buf if buf is not None else bytearray(n)
    view = memoryview(out)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            return b""
        got += k
    return out


def _broker_server(port_q: mp.Queue, sizes: list[int], gather_layout: tuple | None) -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from sglang_tokenlake.transport.broker import Broker
    from sglang_tokenlake.transport.stream import StreamServer

    payloads = {s: np.zeros(s, dtype=np.uint8) for s in sizes}
    kv = None
    if gather_layout is not None:
        import torch

        layers, heads, dim, slots = gather_layout

        class _Pool:
            k_buffer = [torch.zeros(slots, heads, dim, dtype=torch.bfloat16) for _ in range(layers)]
            v_buffer = [torch.zeros(slots, heads, dim, dtype=torch.bfloat16) for _ in range(layers)]

        kv = _Pool()

    def get(req):
        size = req.msg.header["size"]
        if size not in payloads:  # the warm-up of a round-trip measurement
            req.reply("kv", {"found": [False]})
            return
        if kv is not None and req.msg.header.get("gather"):
            import torch

            from sglang_tokenlake import kvio

            n = req.msg.header["tokens"]
            slots = torch.arange(1, n + 1)
            req.reply("kv", {"found": [True]}, [kvio.gather(kv, slots).numpy()])
            return
        req.reply("kv", {"found": [True]}, [payloads[size]])

    b = Broker("tcp://127.0.0.1:0", {"get": get, "ping": lambda r: r.reply("pong")})
    ep = b.start()
    stream = StreamServer("127.0.0.1", {"get": get})
    port_q.put((ep, stream.start()))
    while True:
        time.sleep(3600)


def _zmq_rep_server(port_q: mp.Queue) -> None:
    import zmq

    s = zmq.Context.instance().socket(zmq.REP)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    while True:
        s.send(s.recv())


# -- clients ------------------------------------------------------------------------------


def bench_tcp(port: int, size: int, n: int) -> float:
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(size)
    t0 = time.perf_counter()
    for _ in range(n):
        c.sendall(struct.pack("<Q", size))
        _recv_exact(c, 8)
        _recv_exact(c, size, buf)
    dt = time.perf_counter() - t0
    c.sendall(struct.pack("<Q", 0))
    c.close()
    return n * size / dt


def _warm_up(agent, header: dict) -> None:
    """Wait for the connection: sends before it is up fail fast (ZMQ_IMMEDIATE)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            agent.request("srv", "get", header, timeout=10).result(15)
            return
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def bench_pull(endpoint: str, size: int, n: int, inflight: int, gather_tokens: int = 0,
               stream_port: int | None = None) -> float:
    """Bytes per second pulled: over the KV stream at ``stream_port``, else over ZeroMQ."""
    from sglang_tokenlake.transport.peers import PeerAgent

    agent = PeerAgent(heartbeat_interval=10.0)
    agent.start()
    agent.connect("srv", endpoint)
    header = {"size": size}
    if gather_tokens:
        header.update(gather=True, tokens=gather_tokens)
    _warm_up(agent, header)
    bulk = stream_port is not None
    if bulk:
        agent.set_stream("srv", stream_port)
        agent.request("srv", "get", header, timeout=10, bulk=True).result(15)
    t0 = time.perf_counter()
    pending = []
    got = 0
    for _ in range(n):
        pending.append(agent.request("srv", "get", header, timeout=60, bulk=bulk))
        if len(pending) >= inflight:
            got += pending.pop(0).result(60).buffers[0].nbytes
    for f in pending:
        got += f.result(60).buffers[0].nbytes
    dt = time.perf_counter() - t0
    went = agent.counters["stream_replies"]
    agent.close()
    if bulk and went < n + 1:
        raise RuntimeError(f"only {went} of {n + 1} pulls took the KV stream")
    return got / dt


def bench_rtt_broker(endpoint: str, n: int) -> list[float]:
    from sglang_tokenlake.transport.client import Client

    c = Client(endpoint)
    c.request("ping", timeout=10)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.request("ping", timeout=10)
        out.append(time.perf_counter() - t0)
    c.close()
    return out


def bench_rtt_agent(endpoint: str, n: int, direct: bool = False) -> list[float]:
    from sglang_tokenlake.transport.peers import PeerAgent

    agent = PeerAgent(heartbeat_interval=10.0)
    agent.start()
    agent.connect("srv", endpoint)
    _warm_up(agent, {"size": 0})
    while direct and not agent.counters["direct_sent"]:  # until this thread's socket is up
        agent.request("srv", "ping", timeout=10, direct=True).result(15)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        agent.request("srv", "ping", timeout=10, direct=direct).result(15)
        out.append(time.perf_counter() - t0)
    sent = agent.counters["direct_sent"]
    agent.close()
    if direct and sent < n:
        raise RuntimeError(f"only {sent} of {n} direct requests went direct")
    return out


def bench_rtt_zmq(port: int, n: int) -> list[float]:
    import zmq

    s = zmq.Context.instance().socket(zmq.REQ)
    s.connect(f"tcp://127.0.0.1:{port}")
    msg = b"x" * 64
    s.send(msg)
    s.recv()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.send(msg)
        s.recv()
        out.append(time.perf_counter() - t0)
    s.close()
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "results" / "transport.json"))
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--inflight", type=int, default=4)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    sizes = [256 * 1024, 1 * MiB, 4 * MiB, 16 * MiB]
    # Requests per path per round: 64 MiB of payload (long enough that a connection's
    # warm-up is noise), at least 4.
    per_round = {s: max(4, (64 * MiB) // s // (8 if a.quick else 1)) for s in sizes}
    ctx = mp.get_context("spawn")
    procs = []
    # gather layout: 32 layers x 8 kv heads x 128 dim, bf16 -> 128 KiB per token
    layout = (32, 8, 128, 4096)
    addrs = []
    for target, extra in [(_tcp_server, (sizes,)), (_broker_server, (sizes, layout)),
                          (_zmq_rep_server, ())]:
        q: mp.Queue = ctx.Queue()
        pr = ctx.Process(target=target, args=(q, *extra), daemon=True)
        pr.start()
        procs.append(pr)
        addrs.append(q.get(timeout=120))
    tcp_port, (broker_ep, stream_port), rep_port = addrs
    rows = []
    print(f"{'payload':>10} {'raw TCP GB/s':>13} {'pull GB/s':>10} {'ratio':>6} "
          f"{'pull+gather':>12} {'ratio':>6} {'ZeroMQ GB/s':>12} {'ratio':>6}")
    for size in sizes:
        # Interleaved rounds, medians: loopback speed drifts on a shared machine, and each
        # round's ratio compares paths measured moments apart.
        n = per_round[size]
        tokens = size // (32 * 8 * 256 * 2)
        tcps, pulls, gats, brks = [], [], [], []
        for _ in range(ROUNDS):
            tcps.append(bench_tcp(tcp_port, size, n))
            pulls.append(bench_pull(broker_ep, size, n, a.inflight, stream_port=stream_port))
            if tokens:
                gats.append(bench_pull(broker_ep, size, n, a.inflight, gather_tokens=tokens,
                                       stream_port=stream_port))
            brks.append(bench_pull(broker_ep, size, n, a.inflight))
        tcp, pull, brk = (statistics.median(x) for x in (tcps, pulls, brks))
        gat = statistics.median(gats) if gats else None
        ratios = [p / t for p, t in zip(pulls, tcps)]
        rows.append({"payload_bytes": size, "raw_tcp_gbps": tcp / 1e9, "pull_gbps": pull / 1e9,
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios),
                     "pull_gather_gbps": None if gat is None else gat / 1e9,
                     "gather_tokens": tokens, "zmq_gbps": brk / 1e9,
                     "zmq_ratio": statistics.median(b / t for b, t in zip(brks, tcps))})
        r = rows[-1]
        gs = f"{gat / 1e9:>12.2f} {gat / tcp:>6.2f}" if gat else f"{'-':>12} {'-':>6}"
        print(f"{size // 1024:>8}Ki {tcp / 1e9:>13.2f} {pull / 1e9:>10.2f} {r['ratio']:>6.2f} {gs} "
              f"{brk / 1e9:>12.2f} {r['zmq_ratio']:>6.2f}")
    n_rtt = 500 if a.quick else 3000
    # Interleaved rounds: the machine's drift falls on every path alike.
    rb, ra, rd, rz = [], [], [], []
    for _ in range(5):
        rz += bench_rtt_zmq(rep_port, n_rtt // 5)
        rb += bench_rtt_broker(broker_ep, n_rtt // 5)
        ra += bench_rtt_agent(broker_ep, n_rtt // 5)
        rd += bench_rtt_agent(broker_ep, n_rtt // 5, direct=True)
    rtt = {"zmq_p50_us": 1e6 * pct(rz, 0.5), "zmq_p99_us": 1e6 * pct(rz, 0.99)}
    for path, xs in (("broker", rb), ("agent", ra), ("direct", rd)):
        rtt[f"{path}_p50_us"] = 1e6 * pct(xs, 0.5)
        rtt[f"{path}_p99_us"] = 1e6 * pct(xs, 0.99)
    for path in ("broker", "agent", "direct"):
        rtt[f"{path}_p50_ratio"] = rtt[f"{path}_p50_us"] / rtt["zmq_p50_us"]
        rtt[f"{path}_p99_ratio"] = rtt[f"{path}_p99_us"] / rtt["zmq_p99_us"]
    print(f"\nRPC round trip ({n_rtt} each, 5 interleaved rounds), p50 / p99 us:")
    print(f"  bare ZeroMQ REQ/REP          {rtt['zmq_p50_us']:6.0f} / {rtt['zmq_p99_us']:6.0f}")
    for path, what in (("broker", "Client -> Broker (CLI)"), ("agent", "PeerAgent -> Broker (pool)"),
                       ("direct", "PeerAgent direct (ship, lease)")):
        print(f"  {what:28s} {rtt[f'{path}_p50_us']:6.0f} / {rtt[f'{path}_p99_us']:6.0f}"
              f"   ratio {rtt[f'{path}_p50_ratio']:.2f} / {rtt[f'{path}_p99_ratio']:.2f}")
    for pr in procs:
        pr.terminate()
    out = {"benchmark": "transport", "inflight": a.inflight, "kv_shipping": rows, "rpc": rtt,
           "machine": {"python": platform.python_version(), "cpus": mp.cpu_count()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
