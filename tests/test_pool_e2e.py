"""Three TokenLake workers in one pool beside a stock radix worker (tiny model, float32).

Transient copies and hot-segment replicas are off here, so the pool must hold
exactly one copy of every segment once requests finish (replication has its
own test module).
"""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import assert_memory_invariant, generate, random_tokens, running_pool, wait_idle_status

from sglang_tokenlake.cli import fetch_status
from sglang_tokenlake.cluster import wait_until

pytestmark = pytest.mark.server
SEG = 32


@pytest.fixture(scope="module")
def cluster(tiny_model, log_dir):
    with running_pool(tiny_model, log_dir, 3, segment_size=SEG, stock=True, pool_args=[
            "--no-tokenlake-transient-copies", "--tokenlake-remote-mode", "pull",
            "--tokenlake-replica-budget", "0"]) as pool:
        yield pool.workers, pool.stock


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
    # Pulled over the KV stream, not the broker (no CURVE here).
    assert st["pool"]["counters"]["agent_stream_bytes_received"] >= st["pool"]["counters"]["pulled_bytes"]


def test_the_pool_holds_each_segment_once(cluster):
    workers, _ = cluster
    rng = random.Random(11)
    docs = [random_tokens(rng, 400) for _ in range(3)]
    for i, doc in enumerate(docs):
        for j, w in enumerate(workers):
            generate(w.url, doc + [i, j, 3], 4)
    seen: dict = {}

    def settled():  # copies put to their homes have arrived, surplus ones are dropped
        sts = [fetch_status(w.broker_addr, keys=True) for w in workers]
        seen["designated"] = [k for st in sts for k in st["designated_keys"]]
        seen["local"] = sum(st["local_segments"] for st in sts)
        return sts if seen["local"] == len(set(seen["designated"])) else None

    sts = wait_until(settled, 15, lambda: f"one copy per segment: local={seen['local']}, "
                     f"designated={len(seen['designated'])} ({len(set(seen['designated']))} distinct)",
                     interval=0.5)
    designated, local = seen["designated"], seen["local"]
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

