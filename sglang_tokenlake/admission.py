"""The order in which one worker admits its waiting requests.

SGLang admits waiting requests in queue order (``--schedule-policy fcfs``) as
long as their uncached tokens fit. On a worker whose KV memory holds little
more than the long context it is running, a request whose prefix lives on
another worker (pulled here, or recomputed) evicts the context this worker
holds, and the next request for that context, often already waiting, misses
it: the pool loses its only copy to a transient one. ``resident-first`` admits
first the waiting requests with the most prefix tokens held on this worker
(queue order among equals); a request that has waited ``max_wait`` seconds or
more goes ahead of all of them, in order of arrival, so none starves.

Plain Python (no torch, sglang or zmq): the scheduler hook
(``sglang/admission.py``) gives it each request's arrival time and resident
tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

ADMISSIONS = ("fcfs", "resident-first")


def resident_first(entered: Sequence[float], resident: Sequence[int], now: float,
                   max_wait: float) -> list[int]:
    """Indices of the waiting requests in the order to admit them.

    Args:
        entered: when each request entered the waiting queue (any clock ``now`` shares).
        resident: tokens of each request's prefix held on this worker.
        now: the current time.
        max_wait: seconds after which a request goes ahead of every request that
            has waited less, whatever their resident tokens.

    Overdue requests come first, earliest arrival first; then the others, most
    resident tokens first, earliest arrival first among equals (and queue order
    among equal arrivals: the sort is stable).
    """
    if len(entered) != len(resident):
        raise ValueError(f"{len(entered)} arrival times for {len(resident)} requests")
    if not max_wait > 0:
        raise ValueError(f"max_wait must be positive, got {max_wait!r}")
    idx = range(len(entered))
    overdue = sorted((i for i in idx if now - entered[i] >= max_wait), key=lambda i: entered[i])
    rest = sorted((i for i in idx if now - entered[i] < max_wait),
                  key=lambda i: (-resident[i], entered[i]))
    return overdue + rest
