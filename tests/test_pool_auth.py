"""CURVE: two workers with their own keys work together; a peer without a listed key gets
nothing; an authenticated key cannot speak for a member it does not name."""

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serving import generate, random_tokens, running_pool

from sglang_tokenlake.cli import fetch_status
from sglang_tokenlake.transport.auth import keygen, load_curve_keys
from sglang_tokenlake.transport.client import Client, RemoteError

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    # running_pool makes one key pair per worker (w0, w1) and a status-only one (ops) here.
    return str(tmp_path_factory.mktemp("pool-keys"))


@pytest.fixture(scope="module")
def pair(tiny_model, log_dir, keys):
    # The pool forms (checked with the keys) before any test runs.
    with running_pool(tiny_model, log_dir, 2, segment_size=32, max_total_tokens=8192,
                      curve_dir=keys, pool_args=["--tokenlake-remote-mode", "pull"]) as pool:
        yield pool.workers


def test_authenticated_pool_shares_segments(pair, keys):
    a, b = pair
    rng = random.Random(30)
    doc = random_tokens(rng, 300)
    generate(a.url, doc + [1], 4)
    out = generate(b.url, doc + [2], 4)
    assert out["meta_info"]["cached_tokens"] == 288
    counters = fetch_status(b.broker_addr, curve_dir=keys)["pool"]["counters"]
    assert counters["pulled_segments"] > 0
    assert counters["agent_stream_sent"] == 0  # with CURVE every pull stays on the broker


def test_unauthenticated_peer_gets_nothing(pair, keys, tmp_path):
    a, _ = pair
    with Client(f"tcp://{a.broker_addr}") as c:  # no CURVE at all
        for kind in ("ping", "status", "get", "hello"):
            with pytest.raises(TimeoutError):
                c.request(kind, {"from": "x:1", "keys": [1]}, timeout=1.5)
    keygen(str(tmp_path / "other"), "x")  # valid CURVE, but not on the pool's list
    shutil.copy(Path(keys) / "w0.key", tmp_path / "other" / "a.key")  # a's public certificate
    with Client(f"tcp://{a.broker_addr}",
                curve=load_curve_keys(str(tmp_path / "other"), "x")) as c:
        with pytest.raises(TimeoutError):
            c.request("ping", timeout=1.5)


def test_a_listed_key_cannot_speak_for_another_member(pair, keys):
    a, b = pair
    for key in ("ops", "w1"):  # status-only; the other worker's
        with Client(f"tcp://{a.broker_addr}", curve=load_curve_keys(keys, key)) as c:
            assert c.request("ping", timeout=10).kind == "pong"
            for kind in ("hello", "get", "sync"):
                with pytest.raises(RemoteError, match="not the member"):
                    c.request(kind, {"from": a.broker_addr if key == "w1" else b.broker_addr,
                                     "keys": [1]}, timeout=10)


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
