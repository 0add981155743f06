"""Who is in the pool: members, liveness from heartbeats, and join/leave/restart events.

Plain Python, thread-safe (the broker thread records incoming heartbeats, the
peer agent thread records replies, the scheduler thread reads the live set).

A member is identified by its broker address ``host:port``. A member that has
not been heard from within ``peer_timeout`` seconds is dead and leaves the
placement; hearing from it again makes it rejoin. A new ``boot`` id from a
known member means it restarted: what it held before is gone. At most
``max_members`` members are tracked (seeds and learned ones included); a new
one beyond that is refused.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Member:
    id: str
    capacity: int = 0  # KV tokens it offers to the pool
    boot: str = ""
    last_seen: float = 0.0
    alive: bool = False
    layout: Optional[str] = None  # KV layout fingerprint; must match ours


@dataclass
class MembershipEvents:
    joined: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.joined or self.left or self.restarted)

    def merge(self, other: MembershipEvents) -> None:
        self.joined += other.joined
        self.left += other.left
        self.restarted += other.restarted


class Membership:
    def __init__(self, self_id: str, capacity: int, boot: str, layout: str,
                 peer_timeout: float = 3.0, clock=time.monotonic,
                 max_members: int = 1024) -> None:
        self.self_id = self_id
        self.max_members = max_members
        self.boot = boot
        self.layout = layout
        self.peer_timeout = peer_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._members: dict[str, Member] = {
            self_id: Member(self_id, capacity, boot, clock(), True, layout)
        }
        self.version = 0  # bumped whenever the live set changes

    def add_seed(self, member_id: str) -> bool:
        """A peer named on the command line or by a member: known, not yet alive.

        Returns False when it is new and ``max_members`` are known already."""
        if member_id == self.self_id:
            return True
        with self._lock:
            if member_id not in self._members:
                if len(self._members) >= self.max_members:
                    return False
                self._members[member_id] = Member(member_id)
        return True

    def seen(self, member_id: str, capacity: int, boot: str, layout: Optional[str]) -> MembershipEvents:
        """Record a heartbeat (or its reply) from ``member_id``."""
        ev = MembershipEvents()
        if member_id == self.self_id:
            return ev
        if layout is not None and layout != self.layout:
            raise ValueError(
                f"peer {member_id} has KV layout {layout}, this worker {self.layout}: "
                "workers of one pool must serve the same model with the same KV settings"
            )
        now = self._clock()
        with self._lock:
            m = self._members.get(member_id)
            if m is None:
                if len(self._members) >= self.max_members:
                    raise ValueError(f"{member_id}: {self.max_members} members known already")
                m = self._members[member_id] = Member(member_id)
            if m.alive and m.boot and boot and m.boot != boot:
                ev.restarted.append(member_id)
            if not m.alive:
                ev.joined.append(member_id)
            if ev:
                self.version += 1
            m.capacity, m.boot, m.last_seen, m.alive, m.layout = capacity, boot, now, True, layout
        return ev

    def expire(self) -> MembershipEvents:
        """Mark members not heard from within ``peer_timeout`` as dead."""
        ev = MembershipEvents()
        now = self._clock()
        with self._lock:
            for m in self._members.values():
                if m.id != self.self_id and m.alive and now - m.last_seen > self.peer_timeout:
                    m.alive = False
                    ev.left.append(m.id)
            if ev:
                self.version += 1
        return ev

    def is_alive(self, member_id: str) -> bool:
        with self._lock:
            m = self._members.get(member_id)
            return bool(m and m.alive)

    def alive(self) -> dict[str, int]:
        """Live members (self included) and their capacities."""
        with self._lock:
            return {m.id: max(m.capacity, 1) for m in self._members.values() if m.alive}

    def known(self) -> list[str]:
        with self._lock:
            return [m for m in self._members if m != self.self_id]

    def snapshot(self) -> list[dict]:
        now = self._clock()
        with self._lock:
            return [
                {"id": m.id, "alive": m.alive, "capacity": m.capacity, "boot": m.boot,
                 "last_seen_s": None if not m.last_seen else round(now - m.last_seen, 3),
                 "self": m.id == self.self_id}
                for m in sorted(self._members.values(), key=lambda m: m.id)
            ]
