"""Event counters that several threads update (scheduler, broker, peer agent).

``counters["x"] += 1`` is a read, an add and a write: two threads doing it at
once can lose one of the increments. ``add`` takes a lock; reads see a
consistent value of each counter.
"""

from __future__ import annotations

import threading
from collections import defaultdict


class Counters(defaultdict):
    """A ``defaultdict(int)`` whose increments go through ``add`` (thread-safe)."""

    def __init__(self) -> None:
        super().__init__(int)
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self[name] = self.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self)

    def __reduce__(self):  # copies and pickles are plain dicts
        return (dict, (dict(self),))
