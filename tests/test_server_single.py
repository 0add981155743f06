"""One TokenLake worker in real SGLang beside a stock radix worker (tiny model, float32, CPU).

Every request goes to both servers in the same order, so their caches see the
same history: outputs must be identical, and with segment size == page size
the reported cache hits too.
"""

import json
import random
import subprocess
import sys

import pytest
import requests
from serving import (
    STRICT_ENV,
    assert_memory_invariant,
    generate,
    hf_greedy,
    random_tokens,
    wait_idle_status,
)

from sglang_tokenlake.cli import fetch_status
from sglang_tokenlake.cluster import WorkerSpec, free_port, start_workers, stop_workers, wait_until

pytestmark = pytest.mark.server
PAGE = SEG = 16


@pytest.fixture(scope="module")
def pair(tiny_model, log_dir):
    p1 = free_port()
    p2 = free_port(avoid=[p1])
    specs = [
        WorkerSpec(tiny_model, p1, "radix", page_size=PAGE, max_total_tokens=16384, env=STRICT_ENV,
                   extra_args=["--enable-metrics"]),
        WorkerSpec(tiny_model, p2, "tokenlake", page_size=PAGE, segment_size=SEG,
                   max_total_tokens=16384,
                   env={**STRICT_ENV, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "2"},
                   extra_args=["--enable-metrics", "--tokenlake-log-interval", "1"]),
    ]
    workers = start_workers(specs, log_dir)
    yield workers
    stop_workers(workers)


def both(pair, ids, n=16, **kw):
    radix, tl = pair
    return generate(radix.url, ids, n, **kw), generate(tl.url, ids, n, **kw)


def test_outputs_identical_to_stock_radix_and_to_transformers(pair, tiny_model):
    rng = random.Random(1)
    docs = [random_tokens(rng, n) for n in (120, 200, 317)]
    checked_hf = 0
    for doc in docs:
        for _ in range(3):
            ids = doc + random_tokens(rng, rng.randint(3, 20))
            a, b = both(pair, ids, 24)
            assert b["output_ids"] == a["output_ids"]
            assert b["meta_info"]["cached_tokens"] == a["meta_info"]["cached_tokens"]
            if checked_hf < 3:
                assert b["output_ids"] == hf_greedy(tiny_model, ids, 24)
                checked_hf += 1


def test_cached_tokens_are_the_segment_aligned_hit(pair):
    rng = random.Random(2)
    doc = random_tokens(rng, 150)
    first = both(pair, doc + [5, 6, 7])
    assert [r["meta_info"]["cached_tokens"] for r in first] == [0, 0]
    second = both(pair, doc + [8, 9])
    # 150 shared tokens -> 9 full segments of 16.
    assert [r["meta_info"]["cached_tokens"] for r in second] == [144, 144]
    third = both(pair, doc[:40] + random_tokens(rng, 30))
    assert [r["meta_info"]["cached_tokens"] for r in third] == [32, 32]
    # The first request's output was cached as well: 153 prompt + 16 output
    # tokens = 10 full segments; the follow-up shares them all.
    follow = doc + [5, 6, 7] + first[1]["output_ids"] + [11]
    assert [r["meta_info"]["cached_tokens"] for r in both(pair, follow)] == [160, 160]


def test_hit_lengths_equal_stock_radix_on_a_request_sequence(pair):
    rng = random.Random(3)
    bases = [random_tokens(rng, rng.randint(20, 250)) for _ in range(6)]
    hits = []
    for _ in range(40):
        ids = rng.choice(bases)[: rng.randint(10, 250)] + random_tokens(rng, rng.randint(1, 40))
        a, b = both(pair, ids, rng.randint(1, 12))
        assert b["meta_info"]["cached_tokens"] == a["meta_info"]["cached_tokens"], ids
        assert b["output_ids"] == a["output_ids"]
        hits.append(b["meta_info"]["cached_tokens"])
    assert sum(hits) > 1000  # the sequence really exercises hits


def test_cache_salt_isolates_tenants(pair):
    _, tl = pair
    rng = random.Random(4)
    doc = random_tokens(rng, 100)
    assert generate(tl.url, doc + [3], cache_salt="tenant-a")["meta_info"]["cached_tokens"] == 0
    assert generate(tl.url, doc + [4], cache_salt="tenant-b")["meta_info"]["cached_tokens"] == 0
    assert generate(tl.url, doc + [5])["meta_info"]["cached_tokens"] == 0
    assert generate(tl.url, doc + [6], cache_salt="tenant-a")["meta_info"]["cached_tokens"] == 96


def test_status_path_and_invariant(pair):
    _, tl = pair
    out = subprocess.run(
        [sys.executable, "-m", "sglang_tokenlake.cli", "status", "--addr", tl.broker_addr, "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["segment_size"] == SEG and st["page_size"] == PAGE
    assert st["local_segments"] * SEG == st["memory"]["cached"] > 0
    st = wait_idle_status(tl.broker_addr)
    assert_memory_invariant(st)
    assert st["memory"]["capacity"] == 16384
    assert st["stats"]["hit_tokens"] > 0


def test_slots_held_by_live_requests_are_measured_while_busy(pair):
    """While requests run, the slots their rows hold are counted from the rows
    themselves and match what the allocator and the tree leave over."""
    import threading
    import time

    _, tl = pair
    rng = random.Random(7)
    seen: list[dict] = []
    threads = [threading.Thread(target=generate, args=(tl.url, random_tokens(rng, 150 + 40 * i), 600))
               for i in range(3)]
    for t in threads:
        t.start()

    while any(t.is_alive() for t in threads):  # sample the status while they run
        seen.append(fetch_status(tl.broker_addr)["memory"])
        time.sleep(0.05)
    assert sum(m["held_by_requests"] > 0 for m in seen) >= 3, seen
    assert all(m["unaccounted"] == 0 for m in seen), [m for m in seen if m["unaccounted"]]
    assert_memory_invariant(wait_idle_status(tl.broker_addr))
    # SGLang's own busy-time check ran after every batch (verbose level 2 logs each
    # run; a leak would have failed the scheduler) and the KV page check with it.
    log = tl.log_path.read_text()
    assert "[Mem Check (BUSY)] [full]" in log
    assert "Mem Leak Detected" not in log and "use-after-free" not in log


def test_metrics_and_log_show_the_counters(pair):
    radix, tl = pair
    generate(tl.url, list(range(3, 60)))
    text = requests.get(tl.url + "/metrics", timeout=10).text
    hits = [ln for ln in text.splitlines() if ln.startswith("sglang:tokenlake_hit_tokens_total")]
    assert hits and float(hits[0].rsplit(" ", 1)[1]) > 0
    assert "sglang:tokenlake_miss_tokens_total" in text
    assert "sglang:tokenlake_cached_tokens" in text
    wait_until(lambda: "TokenLake cache: hit_tokens=" in tl.log_path.read_text(), 30,
               "the statistics line in the log (--tokenlake-log-interval 1)")
    # The stock worker has no TokenLake series.
    assert "tokenlake" not in requests.get(radix.url + "/metrics", timeout=10).text
