"""Fuzz a live broker serving a worker's pool handlers.

A seeded generator sends 100,000+ frames over a DEALER socket to a real
``Broker`` bound on tcp://127.0.0.1, serving ``PoolLink.handlers()`` of a fake
worker: every op kind, with valid headers carrying wrong field types, huge
counts, negative and huge integers, nested junk, truncated or missing buffers,
wrong buffer sizes, garbage msgpack and frames over the broker's size limit.
Afterwards the broker thread is alive, a heartbeat from a known member is
answered, no handler raised, and the process grew by less than 50 MB.
"""

from __future__ import annotations

import logging
import random
import time

import msgpack
import pytest
import zmq
from pool_fakes import FakeAgent, FakeHost, FakeNet

from sglang_tokenlake.config import TokenLakeConfig
from sglang_tokenlake.pool import PoolLink
from sglang_tokenlake.pool.leases import DIGEST_BYTES
from sglang_tokenlake.transport.broker import Broker

SELF, PEER = "127.0.0.1:1", "127.0.0.1:2"
OPS = ["hello", "get", "put", "lease", "unlease", "attend", "announce", "evicted", "sync"]
FRAMES = 100_000
UNIQUE = 25_000  # generated messages; each is also sent in cheaper reframed variants
BATCH = 1000


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Junk:
    """Values of every msgpack type, sizes from empty to huge, nested."""

    def __init__(self, rng: random.Random, keys: list[int]) -> None:
        self.rng = rng
        self.keys = keys
        self.ints = [0, 1, -1, 2**31, -(2**63), 2**63 - 1, 2**64 - 1, *range(-9, 99, 7),
                     *(rng.randrange(1 << 64) for _ in range(20)), *keys]
        # Huge counts, made once (building them per message would dominate the run).
        self.huge = [[rng.choice(self.ints) for _ in range(n)] for n in (70_000, 5000, 1025)]
        self.huge.append(list(range(1, 70_001)))  # distinct, valid keys: over the count bound
        self.many_members = [f"h{i}:{i + 1}" for i in range(1100)]

    def int(self):
        return self.rng.choice(self.ints)

    def scalar(self):
        r = self.rng
        return r.choice([
            self.int, lambda: r.random() * 1e300, lambda: float("nan"), lambda: float("inf"),
            lambda: None, lambda: True, lambda: "", lambda: "x" * r.randrange(1, 600),
            lambda: f"10.0.{r.randrange(256)}.{r.randrange(256)}:{r.randrange(1, 70000)}",
            lambda: r.randbytes(r.randrange(0, 300)), lambda: PEER, lambda: "float16",
        ])()

    def value(self, depth: int = 0):
        r = self.rng
        k = r.random()
        if depth > 3 or k < 0.5:
            return self.scalar()
        if k < 0.7:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 6))]
        if k < 0.8:
            return {str(self.scalar())[:20]: self.value(depth + 1) for _ in range(r.randrange(0, 4))}
        if k < 0.805:  # a huge count
            return r.choice(self.huge)
        return [[self.int() for _ in range(r.randrange(0, 4))], [r.randrange(-2, 5)]]

    def keys_list(self):
        r = self.rng
        if r.random() < 0.01:
            return r.choice(self.huge)
        n = r.choice([0, 1, 3, 50])
        out = [r.choice(self.keys) if r.random() < 0.5 else self.int() for _ in range(n)]
        if out and r.random() < 0.3:
            out.append(out[0])  # a duplicate
        return out


def template(op: str, j: Junk) -> dict:
    """A header that looks like the op's (before mutation)."""
    r = j.rng
    h = {"from": PEER if r.random() < 0.8 else j.scalar(), "seq": j.int()}
    if op == "hello":
        h.update(capacity=j.int(), boot="b0" if r.random() < 0.99 else r.choice(["b1", j.scalar()]),
                 layout=None if r.random() < 0.9 else j.scalar(),
                 members=r.choice([[PEER], [j.scalar() for _ in range(r.randrange(5))],
                                   r.choice([j.many_members, j.many_members[:3]])]),
                 horizon=j.scalar(), load=j.scalar(), hot=[j.keys_list()[:5], [1, 2]],
                 observed=j.int(), requests=j.int())
    elif op in ("get", "evicted"):
        h["keys"] = j.keys_list()
    elif op == "put":
        n = r.randrange(0, 3)
        h.update(keys=j.keys_list()[:8] or [1], segs=[r.randrange(-1, 4) for _ in range(n)],
                 tokens=[r.randbytes(r.choice([32, 31, 0])) for _ in range(n)])
    elif op == "lease":
        ks = j.keys_list()[:6]
        h.update(lease=r.choice(["l" * 8, "", "x" * 70, j.scalar()]), keys=ks,
                 digests=[r.randbytes(r.choice([DIGEST_BYTES, 3])) for _ in ks])
    elif op == "unlease":
        h["lease"] = r.choice(["l" * 8, j.scalar()])
    elif op == "attend":
        h.update(dtype=r.choice(["float32", "float16", "cuda", "nonsense", j.scalar()]),
                 heads=r.choice([4, 0, -1, 2**40]), dim=r.choice([8, 0, 3]), v_dim=8,
                 layer=r.choice([0, 1, 7, -1, 2**40]), scale=j.scalar(), cap=j.scalar(),
                 reqs=r.choice([[["l" * 8, 1, [j.int()]]], [[j.scalar(), j.int(), j.value()]],
                                j.value()]))
    elif op == "announce":
        ks = j.keys_list()
        h["chains"] = r.choice([[[ks, [0]]], [[ks, [r.randrange(-1, 80_000)]]], j.value()])
    elif op == "sync":
        h.update(sync=r.choice([None, "abc", j.scalar()]), cursor=r.choice([0, 5, -3, j.int()]))
    return h


def message(i: int, j: Junk, max_frame: int) -> list[bytes]:
    """One generated message (frames after the identity)."""
    r = j.rng
    op = OPS[i % len(OPS)]
    h = template(op, j)
    for _ in range(r.randrange(0, 3)):  # wrong types in the right fields
        if h:
            h[r.choice(list(h))] = j.value()
    if r.random() < 0.1:
        h[str(j.scalar())[:10]] = j.value()  # an unexpected field
    h = {k: v for k, v in h.items() if k not in ("v", "t", "id", "b")}
    bufs = [r.randbytes(r.choice([0, 8, 1024, 4096, 33])) for _ in range(r.choice([0, 0, 1, 2, 3]))]
    sizes = [len(b) for b in bufs]
    k = r.random()
    if k < 0.05:
        sizes = sizes + [5]  # a buffer missing
    elif k < 0.1 and sizes:
        sizes[0] += 1  # a wrong size
    elif k < 0.13:
        sizes = "junk"
    hdr = {"v": 1 if r.random() < 0.97 else r.choice([0, 2, "1"]),
           "t": op if r.random() < 0.97 else r.choice(["status", "nope", 5]),
           "id": i if r.random() < 0.98 else r.choice(["x", None, 1.5]), "b": sizes, **h}
    try:
        head = msgpack.packb(hdr, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        head = msgpack.packb({"v": 1, "t": op, "id": i, "b": []})
    k = r.random()
    if k < 0.03:
        head = head[: r.randrange(len(head))]  # truncated msgpack
    elif k < 0.05:
        head = r.randbytes(r.randrange(1, 64))  # garbage
    elif k < 0.06:
        return [head, *bufs, r.randbytes(7)]  # an extra frame
    return [head, *bufs]


def variant(frames: list[bytes], r: random.Random) -> list[bytes]:
    """Another framing of a generated message: truncated, padded, buffers lost or resized."""
    head, bufs = frames[0], frames[1:]
    k = r.randrange(5)
    if k == 0 and len(head) > 1:
        return [head[: r.randrange(1, len(head))], *bufs]
    if k == 1:
        return [head + r.randbytes(r.randrange(1, 9)), *bufs]
    if k == 2:
        return [head]
    if k == 3:
        return [head, *(b + b"x" for b in bufs), b""]
    return [b"\x80" * r.randrange(0, 3) + head[1:], *bufs]


@pytest.fixture
def live_pool():
    host = FakeHost(4, 256)
    net = FakeNet()
    cfg = TokenLakeConfig(segment_size=4, peers=f"{SELF},{PEER}")
    link = PoolLink(host, cfg, SELF, agent=FakeAgent(net, SELF))  # type: ignore[arg-type]
    host.pool = link
    net.links[SELF] = link
    keys = host.compute(list(range(64)))  # something to get, lease and index
    broker = Broker("tcp://127.0.0.1:0", link.handlers(),
                    max_frame_bytes=link.transfers.max_frame_bytes, name="fuzzed-broker")
    ep = broker.start()
    yield link, broker, ep, keys
    broker.close()


def test_fuzzed_frames_leave_the_broker_serving(live_pool):
    link, broker, ep, keys = live_pool
    quiet = logging.getLogger("sglang_tokenlake")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # refusals are logged; the test counts them instead
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(ep)
    rng = random.Random(20260911)
    junk = Junk(rng, keys)
    hello = link.hello_header()
    ids = iter(range(10**9, 2 * 10**9))

    def heartbeat_answered(timeout: float = 20.0) -> bool:
        """A valid heartbeat from the known member; drains every reply before it."""
        mid = next(ids)
        h = {**hello, "from": PEER, "boot": "b0", "members": [PEER]}
        sock.send_multipart([msgpack.packb({"v": 1, "t": "hello", "id": mid, "b": [], **h})])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sock.poll(100):
                continue
            frames = sock.recv_multipart()
            reply = msgpack.unpackb(frames[0], raw=False)
            if reply.get("id") == mid:
                return reply.get("t") == "hello"
        return False

    try:
        assert heartbeat_answered()  # PEER is a live member from here on
        sent = 0
        rss0 = None
        t0 = time.monotonic()
        while sent < FRAMES:
            for _ in range(BATCH // 4):
                frames = message(sent, junk, broker.max_frame_bytes)
                sock.send_multipart(frames)
                sent += 1
                for _ in range((FRAMES - UNIQUE) // UNIQUE):
                    sock.send_multipart(variant(frames, rng))
                    sent += 1
            assert heartbeat_answered(), f"no answer after {sent} frames"
            if rss0 is None and sent >= 5000:
                rss0 = rss_kib()  # after warm-up: imports, allocator pools, caches
        # Frames over the limit: ZeroMQ drops that connection, never buffers the frame.
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(ep)
        for i in range(3):
            big.send_multipart([msgpack.packb({"v": 1, "t": "put", "id": i, "b": [0]}),
                                b"\0" * (broker.max_frame_bytes + 1)])
        time.sleep(0.5)
        big.close()
        elapsed = time.monotonic() - t0
        assert heartbeat_answered()
        assert broker._thread is not None and broker._thread.is_alive()
        assert broker.counters["handler_errors"] == 0, "a handler raised on fuzzed input"
        assert broker.counters["received"] >= FRAMES
        assert broker.counters["malformed"] > 1000 and link.counters["malformed"] > 1000
        grown = (rss_kib() - rss0) / 1024
        print(f"fuzz: {sent} frames in {elapsed:.1f}s; RSS +{grown:.1f} MB; "
              f"broker {dict(broker.counters)}")
        assert grown < 50, f"RSS grew {grown:.1f} MB"
        link.host.check()
    finally:
        quiet.setLevel(level)
        sock.close()
