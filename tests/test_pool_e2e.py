"""Three TokenLake workers in one pool beside a stock radix worker (tiny model, float32).

Transient copies and hot-segment replicas are off here, so the pool must hold
exactly one copy of every segment once requests finish (replication has its
own test module).
"""

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import STRICT_ENV, assert_memory_invariant, generate, random_tokens, wait_idle_status

from sglang_tokenlake.cli import fetch_status
from sglang_tokenlake.cluster import (
    BROKER_PORT_OFFSET,
    WorkerSpec,
    free_port,
    start_workers,
    stop_workers,
)

pytestmark = pytest.mark.server
SEG = 32


@pytest.fixture(scope="module")
def cluster(tiny_model, log_dir):
    ports: list[int] = []
    for _ in range(4):
        ports.append(free_port(avoid=ports))
    peers = ",".join(f"127.0.0.1:{p + BROKER_PORT_OFFSET}" for p in ports[:3])
    pool_args = ["--tokenlake-peers", peers, "--no-tokenlake-transient-copies",
                 "--tokenlake-remote-mode", "pull", "--tokenlake-replica-budget", "0"]
    specs = [
        WorkerSpec(tiny_model, p, "tokenlake", page_size=16, segment_size=SEG,
                   max_total_tokens=16384, env=STRICT_ENV, extra_args=pool_args)
        for p in ports[:3]
    ] + [WorkerSpec(tiny_model, ports[3], "radix", page_size=16, max_total_tokens=16384,
                    env=STRICT_ENV)]
    workers = start_workers(specs, log_dir)
    _wait_members(workers[:3], 3)
    yield workers[:3], workers[3]
    stop_workers(workers)


def _wait_members(workers, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sts = [fetch_status(w.broker_addr) for w in workers]
        if all(sum(m["alive"] for m in st["pool"]["members"]) == n for st in sts):
            return sts
        time.sleep(0.5)
    raise AssertionError(f"members never converged: {[st['pool']['members'] for st in sts]}")


def test_prefix_computed_on_one_worker_is_a_hit_on_another(cluster):
    (a, b, c), stock = cluster
    rng = random.Random(10)
    doc = random_tokens(rng, 600)
    first = generate(a.url, doc + [5, 6, 7], 24)
    assert first["meta_info"]["cached_tokens"] == 0
    assert first["output_ids"] == generate(stock.url, doc + [5, 6, 7], 24)["output_ids"]
    for w in (b, c):
        ids = doc + random_tokens(rng, 9)
        out = generate(w.url, ids, 24)
        # 600 shared tokens: 18 full segments of 32.
        assert out["meta_info"]["cached_tokens"] == 576
        assert out["output_ids"] == generate(stock.url, ids, 24)["output_ids"]
    st = fetch_status(b.broker_addr)
    assert st["pool"]["counters"]["pulled_segments"] > 0
    assert st["pool"]["counters"]["pulled_bytes"] > 0


def test_the_pool_holds_each_segment_once(cluster):
    workers, _ = cluster
    rng = random.Random(11)
    docs = [random_tokens(rng, 400) for _ in range(3)]
    for i, doc in enumerate(docs):
        for j, w in enumerate(workers):
            generate(w.url, doc + [i, j, 3], 4)
    deadline = time.monotonic() + 15
    while True:
        sts = [fetch_status(w.broker_addr, keys=True) for w in workers]
        designated = [k for st in sts for k in st["designated_keys"]]
        local = sum(st["local_segments"] for st in sts)
        if local == len(set(designated)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(designated) == len(set(designated)), "a segment is designated on two workers"
    assert local == len(set(designated)), (local, len(set(designated)))
    # Every worker is home to a share of the segments.
    assert all(st["pool"]["designated_segments"] > 0 for st in sts)
    for st in sts:
        assert st["pool"]["transient_segments"] == 0


def test_cache_salt_never_crosses_workers(cluster):
    (a, b, c), _ = cluster
    rng = random.Random(12)
    doc = random_tokens(rng, 200)
    assert generate(a.url, doc + [1], cache_salt="tenant-1")["meta_info"]["cached_tokens"] == 0
    assert generate(b.url, doc + [2], cache_salt="tenant-2")["meta_info"]["cached_tokens"] == 0
    assert generate(c.url, doc + [3])["meta_info"]["cached_tokens"] == 0
    assert generate(c.url, doc + [4], cache_salt="tenant-1")["meta_info"]["cached_tokens"] == 192


def test_soak_keeps_every_worker_consistent(cluster):
    workers, stock = cluster
    rng = random.Random(13)
    docs = [random_tokens(rng, rng.randint(100, 500)) for _ in range(8)]
    jobs = [(rng.choice(docs)[: rng.randint(40, 500)] + random_tokens(rng, rng.randint(1, 20)),
             rng.randrange(3)) for _ in range(150)]

    def run(job):
        ids, w = job
        return generate(workers[w].url, ids, 6)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(run, jobs))
    hits = sum(r["meta_info"]["cached_tokens"] for r in results)
    assert hits > 0
    for (ids, _), r in zip(jobs[:40], results[:40]):
        assert r["output_ids"] == generate(stock.url, ids, 6)["output_ids"]
    for w in workers:
        assert w.alive()
        assert_memory_invariant(wait_idle_status(w.broker_addr))
        assert "Traceback" not in w.log_path.read_text()

