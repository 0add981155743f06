"""The pool's threads name themselves for the kernel (transport/threads.py), so a worker's
CPU can be split between the pool's threads and the scheduler's (bench/cpuquota.cpu_times)."""

import sys
import threading
from pathlib import Path

import pytest
import zmq

from sglang_tokenlake.transport import threads
from sglang_tokenlake.transport.broker import Broker

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names: Linux")


def _comm(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_os_name_is_prefixed_and_cut_to_the_kernels_limit():
    assert threads.os_name("broker") == "tl-broker"
    assert threads.os_name("a-very-long-role-name") == "tl-a-very-long-"
    assert len(threads.os_name("x" * 40).encode()) == threads.MAX_NAME_BYTES


@linux
def test_a_thread_names_itself_and_only_itself():
    seen = {}

    def run():
        seen["ok"] = threads.name_this_thread("kv-serve")
        seen["comm"] = _comm(threading.get_native_id())

    before = _comm(threading.get_native_id())
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == {"ok": True, "comm": "tl-kv-serve"}
    assert _comm(threading.get_native_id()) == before  # the caller's name is untouched


@linux
def test_the_brokers_thread_carries_the_pool_prefix():
    ctx = zmq.Context()
    b = Broker("tcp://127.0.0.1:0", {}, context=ctx)
    try:
        b.start()
        tid = b._thread.native_id
        assert _comm(tid) == "tl-broker"
    finally:
        b.close()
        ctx.term()
