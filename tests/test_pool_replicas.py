"""Hot segments get replicas beyond their home; cold ones keep one copy."""

import random
import time

import pytest
from serving import STRICT_ENV, generate, random_tokens

from sglang_tokenlake.cli import fetch_status
from sglang_tokenlake.cluster import (
    BROKER_PORT_OFFSET,
    WorkerSpec,
    free_port,
    start_workers,
    stop_workers,
)
from sglang_tokenlake.segments import request_namespace, segment_keys

pytestmark = pytest.mark.server
SEG = 32


@pytest.fixture(scope="module")
def workers(tiny_model, log_dir):
    ports: list[int] = []
    for _ in range(3):
        ports.append(free_port(avoid=ports))
    peers = ",".join(f"127.0.0.1:{p + BROKER_PORT_OFFSET}" for p in ports)
    args = ["--tokenlake-peers", peers, "--no-tokenlake-transient-copies",
            "--tokenlake-remote-mode", "pull", "--tokenlake-hot-window", "64"]
    ws = start_workers([WorkerSpec(tiny_model, p, "tokenlake", page_size=16, segment_size=SEG,
                                   max_total_tokens=16384, env=STRICT_ENV, extra_args=args)
                        for p in ports], log_dir)
    yield ws
    stop_workers(ws)


def _holders(workers, keys):
    sts = [fetch_status(w.broker_addr, keys=True) for w in workers]
    return sts, {k: sum(k in st["designated_keys"] for st in sts) for k in keys}


def test_hot_segments_get_replicas_and_cold_ones_do_not(workers):
    rng = random.Random(14)
    model = workers[0].spec.model
    hot = random_tokens(rng, 2 * SEG)  # two segments every request reads
    cold = random_tokens(rng, 4 * SEG)
    generate(workers[0].url, cold + [1], 2)
    outs = []
    for i in range(45):
        ids = hot + random_tokens(rng, 20)
        out = generate(workers[i % 3].url, ids, 2)
        outs.append(out)
        if i == 20:
            time.sleep(2.5)  # replica counts are replanned every second
    assert all(o["meta_info"]["cached_tokens"] == 2 * SEG for o in outs[3:])
    hot_keys = {f"{k:016x}" for k in segment_keys(hot, SEG, request_namespace(model))}
    cold_keys = {f"{k:016x}" for k in segment_keys(cold, SEG, request_namespace(model))}
    deadline = time.monotonic() + 15
    while True:
        sts, holders = _holders(workers, hot_keys)
        if all(n >= 2 for n in holders.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
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
