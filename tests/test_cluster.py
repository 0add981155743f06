"""Ports and peers of a pool (``PoolSpec``), free-port picking and ``wait_until`` (no servers)."""

import itertools

import pytest

from sglang_tokenlake.cluster import (
    BROKER_PORT_OFFSET,
    PoolSpec,
    WorkerSpec,
    free_port,
    wait_until,
    with_nccl_ports,
)


def test_pick_gives_distinct_http_and_broker_ports():
    spec = PoolSpec.pick(6)
    every = [*spec.ports, *(p + BROKER_PORT_OFFSET for p in spec.ports)]
    assert len(set(every)) == 12
    other = free_port(avoid=spec.ports)
    assert other not in every and other + BROKER_PORT_OFFSET not in every


def test_peers_and_worker_args():
    spec = PoolSpec((20001, 20002, 20003))
    assert spec.broker_addrs == ["127.0.0.1:21001", "127.0.0.1:21002", "127.0.0.1:21003"]
    assert spec.peers == "127.0.0.1:21001,127.0.0.1:21002,127.0.0.1:21003"
    specs = spec.worker_specs("m", extra_args=["--x"], page_size=16, segment_size=32)
    assert [s.port for s in specs] == [20001, 20002, 20003]
    for s in specs:
        assert s.cache_backend == "tokenlake" and (s.page_size, s.segment_size) == (16, 32)
        assert s.extra_args == ["--tokenlake-peers", spec.peers, "--x"]
    assert PoolSpec((20001,)).peer_args() == []  # a pool of one
    assert PoolSpec.pick(3, base_port=25000).ports == (25000, 25001, 25002)
    assert PoolSpec((1,), host="10.0.0.2").peers == "10.0.0.2:1001"


def test_each_worker_of_a_batch_gets_its_own_nccl_port():
    # Left to SGLang, workers starting together draw their rendezvous port independently
    # and two of them can take the same one (EADDRINUSE at start-up).
    pool = PoolSpec.pick(4)
    specs = pool.worker_specs("m") + [WorkerSpec("m", 12345, nccl_port=23456),
                                      WorkerSpec("m", 12346, extra_args=["--nccl-port", "23457"])]
    out = with_nccl_ports(specs)
    assert [s.port for s in out] == [s.port for s in specs]
    assert out[4].nccl_port == 23456 and out[5].nccl_port is None  # chosen by the caller: kept
    drawn = [s.nccl_port for s in out[:4]]
    every = [*pool.ports, *(p + BROKER_PORT_OFFSET for p in pool.ports), 12345, 12346,
             12345 + BROKER_PORT_OFFSET, 12346 + BROKER_PORT_OFFSET, 23456]
    assert len(set(drawn)) == 4 and not set(drawn) & set(every)
    for s in out[:4]:
        argv = s.argv()
        assert argv[argv.index("--nccl-port") + 1] == str(s.nccl_port)
    assert out[5].argv().count("--nccl-port") == 1


def test_wait_until_returns_the_value_or_names_what_it_waited_for():
    n = itertools.count()
    assert wait_until(lambda: next(n) >= 3 and "ok", 5, "three polls", interval=0.001) == "ok"
    with pytest.raises(TimeoutError, match=r"after 0.05s waiting for nothing: state 7"):
        wait_until(lambda: None, 0.05, lambda: "nothing: state 7", interval=0.01)
