"""Soak: 500 requests with random shared prefixes under a KV pool small enough
to force eviction many times. No error, no leaked slot."""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import STRICT_ENV, assert_memory_invariant, generate, random_tokens, wait_idle_status

from sglang_tokenlake.cluster import WorkerSpec, free_port, start_workers, stop_workers

pytestmark = pytest.mark.server
SEG = 32


@pytest.fixture(scope="module")
def worker(tiny_model, log_dir):
    spec = WorkerSpec(tiny_model, free_port(), "tokenlake", page_size=16, segment_size=SEG,
                      max_total_tokens=1024, env=STRICT_ENV)
    (w,) = start_workers([spec], log_dir)
    yield w
    stop_workers([w])


def test_soak_500_requests_under_eviction(worker):
    rng = random.Random(5)
    docs = [random_tokens(rng, rng.randint(64, 400)) for _ in range(12)]
    jobs = []
    for _ in range(500):
        ids = rng.choice(docs)[: rng.randint(8, 400)] + random_tokens(rng, rng.randint(1, 40))
        jobs.append((ids, rng.randint(1, 8), rng.choice([None, None, None, "tenant-x"])))

    def run(job):
        ids, n, salt = job
        out = generate(worker.url, ids, n, **({"cache_salt": salt} if salt else {}))
        return ids, n, out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    for ids, n, out in results:
        cached = out["meta_info"]["cached_tokens"]
        assert cached % SEG == 0 and 0 <= cached <= len(ids) - 1, (cached, len(ids))
        assert len(out["output_ids"]) == n
    hit = sum(out["meta_info"]["cached_tokens"] for _, _, out in results)
    assert hit > 0
    assert worker.alive()
    st = wait_idle_status(worker.broker_addr)
    assert_memory_invariant(st)
    assert st["memory"]["capacity"] == 1024
    assert st["stats"]["evicted_segments"] >= 100, st["stats"]
    assert st["stats"]["requests"] >= 500
    log = worker.log_path.read_text()
    assert "leak" not in log.lower() and "Traceback" not in log
