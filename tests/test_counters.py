"""Counters updated from several threads lose no increment."""

import sys
import threading

from sglang_tokenlake.counters import Counters


def test_concurrent_adds_are_all_counted():
    c = Counters()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        def work():
            for _ in range(20000):
                c.add("x")
                c.add("bytes", 3)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert c.snapshot() == {"x": 80000, "bytes": 240000}
    assert c["missing"] == 0 and dict(c)["x"] == 80000
