"""Per-request state keyed by the request object, without keeping it alive.

The scheduler's request objects are the keys (they are not hashable by value).
An entry is found only by the very object it was made for, even if another
object later gets the same ``id``; entries of requests that were dropped
without a release (an abort in the waiting queue) vanish at the next ``sweep``
once the object is gone, handing their values to ``on_drop``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, Optional, TypeVar

V = TypeVar("V")


class RequestTable(Generic[V]):
    def __init__(self, on_drop: Optional[Callable[[V], None]] = None) -> None:
        self._entries: dict[int, tuple[Callable[[], Any], V]] = {}
        self.on_drop = on_drop

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, req: Any) -> bool:
        return self.get(req) is not None

    def get(self, req: Any) -> Optional[V]:
        entry = self._entries.get(id(req))
        if entry is None or entry[0]() is not req:
            return None
        return entry[1]

    def set(self, req: Any, value: V) -> None:
        try:
            ref: Callable[[], Any] = weakref.ref(req)
        except TypeError:  # not weak-referenceable: kept until popped
            ref = (lambda r: (lambda: r))(req)
        self._entries[id(req)] = (ref, value)

    def pop(self, req: Any) -> Optional[V]:
        entry = self._entries.get(id(req))
        if entry is None or entry[0]() is not req:
            return None
        del self._entries[id(req)]
        return entry[1]

    def values(self) -> Iterator[V]:
        return iter([v for _, v in self._entries.values()])

    def clear(self) -> None:
        self._entries.clear()

    def sweep(self) -> int:
        """Drop entries whose request object is gone; returns how many."""
        dead = [k for k, (ref, _) in self._entries.items() if ref() is None]
        for k in dead:
            _, value = self._entries.pop(k)
            if self.on_drop is not None:
                self.on_drop(value)
        return len(dead)
