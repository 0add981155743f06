"""Hot segments get replicas beyond their home; cold ones keep one copy."""

import random

import pytest
from serving import generate, random_tokens, running_pool

from sglang_tokenlake.cli import fetch_status
from sglang_tokenlake.cluster import wait_until
from sglang_tokenlake.segments import request_namespace, segment_keys

pytestmark = pytest.mark.server
SEG = 32


@pytest.fixture(scope="module")
def workers(tiny_model, log_dir):
    with running_pool(tiny_model, log_dir, 3, segment_size=SEG, pool_args=[
            "--no-tokenlake-transient-copies", "--tokenlake-remote-mode", "pull",
            "--tokenlake-hot-window", "64", "--tokenlake-replan-every", "8"]) as pool:
        yield pool.workers


def _holders(workers, keys):
    sts = [fetch_status(w.broker_addr, keys=True) for w in workers]
    return sts, {k: sum(k in st["designated_keys"] for st in sts) for k in keys}


def _wait_pool_requests(workers, n: int) -> None:
    """Until every worker counts ``n`` requests pool-wide (its own + its peers' beacons)."""
    seen: list[int] = []

    def counted() -> bool:
        seen[:] = [fetch_status(w.broker_addr)["pool"]["pool_requests"] for w in workers]
        return all(c >= n for c in seen)

    wait_until(counted, 15, lambda: f"{n} pool-wide requests on every worker: {seen}")


def test_hot_segments_get_replicas_and_cold_ones_do_not(workers):
    rng = random.Random(14)
    ns = fetch_status(workers[0].broker_addr)["namespace"]  # the workers' key namespace
    hot = random_tokens(rng, 2 * SEG)  # two segments every request reads
    cold = random_tokens(rng, 4 * SEG)
    generate(workers[0].url, cold + [1], 2)
    outs = []
    for i in range(45):
        ids = hot + random_tokens(rng, 20)
        out = generate(workers[i % 3].url, ids, 2)
        outs.append(out)
        if i == 20:  # every worker hears the others' hotness (beacons) before replanning
            _wait_pool_requests(workers, 2 + i)
    assert all(o["meta_info"]["cached_tokens"] == 2 * SEG for o in outs[3:])
    hot_keys = {f"{k:016x}" for k in segment_keys(hot, SEG, request_namespace(ns))}
    cold_keys = {f"{k:016x}" for k in segment_keys(cold, SEG, request_namespace(ns))}
    seen: dict = {}

    def replicated() -> bool:
        seen["sts"], seen["holders"] = _holders(workers, hot_keys)
        return all(n >= 2 for n in seen["holders"].values())

    wait_until(replicated, 15, lambda: f"two holders per hot segment: {seen['holders']}",
               interval=0.5)
    sts, holders = seen["sts"], seen["holders"]
    assert all(n >= 2 for n in holders.values()), holders
    assert any(st["pool"]["replicas_planned"] > 0 for st in sts)
    _, cold_holders = _holders(workers, cold_keys)
    assert all(n == 1 for n in cold_holders.values()), cold_holders
    # A worker holding replicas serves the hot prefix without pulling it again.
    replica_holders = [w for w, st in zip(workers, sts) if hot_keys <= set(st["designated_keys"])]
    assert len(replica_holders) >= 2
    for w in replica_holders:
        pulled = fetch_status(w.broker_addr)["pool"]["counters"].get("pulled_segments", 0)
        for _ in range(3):
            out = generate(w.url, hot + random_tokens(rng, 20), 2)
            assert out["meta_info"]["cached_tokens"] == 2 * SEG
        assert fetch_status(w.broker_addr)["pool"]["counters"].get("pulled_segments", 0) == pulled
