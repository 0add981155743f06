"""CURVE: two workers sharing pool keys work together; a peer without the keys gets nothing."""

import random
import subprocess
import sys

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
from sglang_tokenlake.transport.auth import keygen
from sglang_tokenlake.transport.client import Client

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool-keys")
    out = subprocess.run([sys.executable, "-m", "sglang_tokenlake.cli", "keygen", str(d)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (d / "pool.key").exists() and (d / "pool.key_secret").exists()
    return str(d)


@pytest.fixture(scope="module")
def pair(tiny_model, log_dir, keys):
    p1 = free_port()
    p2 = free_port(avoid=[p1])
    peers = ",".join(f"127.0.0.1:{p + BROKER_PORT_OFFSET}" for p in (p1, p2))
    args = ["--tokenlake-peers", peers, "--tokenlake-curve-dir", keys,
            "--tokenlake-remote-mode", "pull"]
    specs = [WorkerSpec(tiny_model, p, "tokenlake", page_size=16, segment_size=32,
                        max_total_tokens=8192, env=STRICT_ENV, extra_args=args) for p in (p1, p2)]
    workers = start_workers(specs, log_dir)
    yield workers
    stop_workers(workers)


def test_authenticated_pool_shares_segments(pair, keys):
    a, b = pair
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = fetch_status(a.broker_addr, curve_dir=keys)
        if sum(m["alive"] for m in st["pool"]["members"]) == 2:
            break
        time.sleep(0.5)
    rng = random.Random(30)
    doc = random_tokens(rng, 300)
    generate(a.url, doc + [1], 4)
    out = generate(b.url, doc + [2], 4)
    assert out["meta_info"]["cached_tokens"] == 288
    assert fetch_status(b.broker_addr, curve_dir=keys)["pool"]["counters"]["pulled_segments"] > 0


def test_unauthenticated_peer_gets_nothing(pair, tmp_path):
    a, _ = pair
    with Client(f"tcp://{a.broker_addr}") as c:  # no CURVE at all
        for kind in ("ping", "status", "get", "hello"):
            with pytest.raises(TimeoutError):
                c.request(kind, {"from": "x:1", "keys": [1]}, timeout=1.5)
    other = keygen(str(tmp_path / "other"))  # valid CURVE, but not the pool's keys
    import zmq.auth

    pub, sec = zmq.auth.load_certificate(str(other[1]))
    server_pub, _ = zmq.auth.load_certificate(str(other[0]))
    with Client(f"tcp://{a.broker_addr}", curve_server_key=server_pub, curve_public_key=pub,
                curve_secret_key=sec) as c:
        with pytest.raises(TimeoutError):
            c.request("ping", timeout=1.5)


def test_status_cli_with_keys(pair, keys):
    a, _ = pair
    out = subprocess.run(
        [sys.executable, "-m", "sglang_tokenlake.cli", "status", "--addr", a.broker_addr,
         "--curve-dir", keys], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pool: members alive=" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "sglang_tokenlake.cli", "status", "--addr", a.broker_addr,
         "--timeout", "1.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "TimeoutError" in out.stderr
