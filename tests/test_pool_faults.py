"""Faults in a 3-worker pool: malformed frames at a broker, a home SIGKILLed while
requests run, and its return. A failure in the pool must never produce a wrong token."""

import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import zmq
from serving import assert_memory_invariant, generate, random_tokens, running_pool, wait_idle_status

from sglang_tokenlake.cli import fetch_status
from sglang_tokenlake.cluster import Worker, wait_until
from sglang_tokenlake.transport.client import Client
from sglang_tokenlake.transport.frames import encode

pytestmark = pytest.mark.server
SEG = 32
PEER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def cluster(tiny_model, log_dir):
    with running_pool(tiny_model, log_dir, 3, segment_size=SEG, stock=True, pool_args=[
            "--no-tokenlake-transient-copies", "--tokenlake-peer-timeout", str(PEER_TIMEOUT),
            "--tokenlake-heartbeat-interval", "0.3", "--tokenlake-pull-timeout", "1.5",
            # strict per-segment homes: a rejoining member must get its segments handed over
            # (with two choices a survivor stays one of its segments' top-2 homes, and with
            # executor placement any holder is a home: nothing moves)
            "--tokenlake-placement", "segment", "--tokenlake-placement-choices", "1"]) as pool:
        yield pool.workers, pool.stock


def _alive_members(w):
    return {m["id"] for m in fetch_status(w.broker_addr)["pool"]["members"] if m["alive"]}


def _running(*workers) -> bool:
    """Does a request hold slots on any of ``workers`` right now?"""
    return any(fetch_status(w.broker_addr)["memory"]["held_by_requests"] > 0 for w in workers)


def _malformed_messages(rng: random.Random, member: str, n: int):
    """(frames, level) for n bad messages; level 'frame' fails decoding, 'field' fails validation."""
    out = []
    for i in range(n):
        r = i % 10
        if r in (0, 1):
            out.append(([rng.randbytes(rng.randint(0, 64))], "frame"))
        elif r == 2:
            good = encode("get", i, {"from": member, "keys": [1, 2, 3]})[0]
            out.append(([good[: rng.randint(1, len(good) - 1)]], "frame"))  # truncated msgpack
        elif r == 3:
            out.append(([msgpack.packb([1, 2, 3])], "frame"))  # not a map
        elif r == 4:
            out.append((encode("no-such-kind", i, {"from": member}), "frame"))
        elif r == 5:
            frames = encode("put", i, {"from": member}, [b"x" * 10, b"y" * 20])
            out.append((frames[:2], "frame"))  # announces 2 buffers, sends 1
        elif r == 6:
            h = msgpack.unpackb(encode("put", i, {"from": member}, [b"xx"])[0])
            h["b"] = [5]  # size disagrees with the frame
            out.append(([msgpack.packb(h), b"xx"], "frame"))
        elif r == 7:  # a put whose KV buffer has the wrong size
            frames = encode("put", i, {"from": member, "keys": [7, 8], "segs": [1],
                                       "tokens": [b"\0" * (SEG * 8)]}, [rng.randbytes(100)])
            out.append((frames, "field"))
        elif r == 8:
            out.append((encode("announce", i, {"from": member, "chains": [[["a"], [0]]]}), "field"))
        else:
            out.append((encode("get", i, {"from": member, "keys": "not-a-list"}), "field"))
    return out


def test_broker_survives_10000_malformed_messages(cluster):
    (a, b, _), stock = cluster
    before = fetch_status(a.broker_addr)
    rng = random.Random(20)
    msgs = _malformed_messages(rng, b.broker_addr, 10_000)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{a.broker_addr}")
    for frames, _ in msgs:
        s.send_multipart(frames)
    # Field-level errors are answered; drain the answers.
    want = sum(1 for _, lvl in msgs if lvl == "field")
    got = 0
    deadline = time.monotonic() + 60
    while got < want and time.monotonic() < deadline:
        if s.poll(1000):
            s.recv_multipart()
            got += 1
    s.close()
    assert got == want
    with Client(f"tcp://{a.broker_addr}") as c:
        assert c.request("ping", timeout=10).kind == "pong"
    after = fetch_status(a.broker_addr, timeout=30)
    frame_level = sum(1 for _, lvl in msgs if lvl == "frame")
    assert after["broker"]["malformed"] - before["broker"]["malformed"] == frame_level
    assert after["pool"]["counters"].get("malformed", 0) >= want
    assert "dropped a malformed message" in a.log_path.read_text()
    # And it still serves requests correctly.
    ids = random_tokens(rng, 150)
    assert generate(a.url, ids, 12)["output_ids"] == generate(stock.url, ids, 12)["output_ids"]
    assert a.alive()


def test_unknown_peer_is_refused(cluster):
    (a, _, _), _ = cluster
    with Client(f"tcp://{a.broker_addr}") as c:
        for kind, h in [("get", {"keys": [1]}), ("put", {"keys": [1], "segs": [], "tokens": []}),
                        ("announce", {"chains": []}), ("evicted", {"keys": [1]})]:
            with pytest.raises(Exception, match="unknown peer"):
                c.request(kind, {"from": "10.9.9.9:1", **h}, timeout=10)
    assert fetch_status(a.broker_addr)["pool"]["counters"]["refused_unknown_peer"] >= 4


def test_sigkill_a_home_while_requests_run_then_it_rejoins(cluster, tiny_model, log_dir):
    (a, b, c), stock = cluster
    wait_until(lambda: len(_alive_members(a)) == 3, 30, "3 live members")
    rng = random.Random(21)
    docs = [random_tokens(rng, 320) for _ in range(6)]
    for doc in docs:  # computed on A: segments homed at B and C are put there
        generate(a.url, doc + [1, 2], 2)
    wait_until(lambda: fetch_status(c.broker_addr)["pool"]["designated_segments"] > 0, 15,
          "C to hold segments")
    jobs = [(rng.choice(docs) + random_tokens(rng, rng.randint(2, 10)), rng.choice([a, b]))
            for _ in range(48)]
    expected = [generate(stock.url, ids, 10)["output_ids"] for ids, _ in jobs]

    def run(job):
        ids, w = job
        t0 = time.monotonic()
        out = generate(w.url, ids, 10, timeout=120)
        return out, time.monotonic() - t0

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run, j) for j in jobs]
        wait_until(lambda: _running(a, b), 30, "requests to run on A or B", interval=0.02)
        c.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        results = [f.result(timeout=180) for f in futures]
    for (out, took), want in zip(results, expected):
        assert out["output_ids"] == want
        assert took < 60
    # The dead home leaves the placement within the peer timeout (+ heartbeat slack).
    wait_until(lambda: c.broker_addr not in _alive_members(a), PEER_TIMEOUT + 3, "C to leave")
    assert time.monotonic() - killed_at < 60
    for w in (a, b):
        assert_memory_invariant(wait_idle_status(w.broker_addr))
    # The two survivors hold every segment of docs[0] (recomputed if C had it).
    generate(a.url, docs[0] + [8], 2)
    wait_idle_status(a.broker_addr)
    before = _designated(a) | _designated(b)
    # C comes back on the same address and rejoins: the segments now homed at C are
    # handed over to it (the survivors held their only copies), none is lost.
    c2 = Worker(c.spec, log_dir, name=c.name + "-restarted").start()
    try:
        c2.wait_ready()
        wait_until(lambda: c.broker_addr in _alive_members(a), 20, "C to rejoin")
        wait_until(lambda: _designated(c2) and before <= _designated(a) | _designated(b) | _designated(c2),
              15, "segments homed at C to move there")
        assert before & _designated(c2)
        ids = docs[0] + [9, 9, 9]
        out = generate(c2.url, ids, 10)
        assert out["output_ids"] == generate(stock.url, ids, 10)["output_ids"]
        assert out["meta_info"]["cached_tokens"] == len(docs[0])  # every segment from the pool
        for w in (a, b, c2):
            assert_memory_invariant(wait_idle_status(w.broker_addr))
    finally:
        c2.stop()


def _designated(w) -> set[str]:
    return set(fetch_status(w.broker_addr, keys=True)["designated_keys"])
