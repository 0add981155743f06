"""Membership: liveness from heartbeats, joins, leaves, restarts, layout checks."""

import pytest

from sglang_tokenlake.membership import Membership


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make():
    clock = Clock()
    return Membership("a:1", 1000, "boot-a", "L", peer_timeout=3.0, clock=clock), clock


def test_join_leave_rejoin():
    m, clock = make()
    m.add_seed("b:1")
    assert m.alive() == {"a:1": 1000}
    ev = m.seen("b:1", 500, "boot-b", "L")
    assert ev.joined == ["b:1"] and m.alive() == {"a:1": 1000, "b:1": 500}
    v = m.version
    assert not m.seen("b:1", 500, "boot-b", "L")  # a plain heartbeat changes nothing
    assert m.version == v
    clock.t += 2.9
    assert not m.expire()
    clock.t += 0.2
    ev = m.expire()
    assert ev.left == ["b:1"] and not m.is_alive("b:1") and m.version > v
    ev = m.seen("b:1", 500, "boot-b", "L")
    assert ev.joined == ["b:1"]


def test_restart_is_detected_by_boot_id():
    m, _ = make()
    m.seen("b:1", 500, "boot-1", "L")
    ev = m.seen("b:1", 500, "boot-2", "L")
    assert ev.restarted == ["b:1"] and not ev.joined


def test_layout_mismatch_is_refused():
    m, _ = make()
    with pytest.raises(ValueError, match="same model"):
        m.seen("b:1", 500, "boot", "other")
    assert not m.is_alive("b:1")


def test_self_is_always_alive_and_gossip_is_ignored_for_self():
    m, clock = make()
    assert not m.seen("a:1", 1, "x", "L")
    clock.t += 1000
    m.expire()
    assert m.is_alive("a:1")
    snap = {s["id"]: s for s in m.snapshot()}
    assert snap["a:1"]["self"] and snap["a:1"]["alive"]
