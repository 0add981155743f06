"""``--tokenlake-admission resident-first`` inside SGLang's scheduler.

An AFTER hook of ``SchedulePolicy.calc_priority`` (SGLang's plugin hook
registry): SGLang has just put the waiting queue in its ``fcfs`` order; the
hook reorders it in place by ``admission.resident_first`` from each request's
time in the queue and its prefix tokens held on this worker
(``TokenLakeCache.resident_tokens``, which touches nothing). The plugin refuses
the flag with another ``--schedule-policy`` or with priority scheduling, whose
orders it would undo.
"""

from __future__ import annotations

import time
from typing import Any

from sglang_tokenlake.admission import resident_first

MAX_REORDERED = 256
"""Only the head of a longer queue is reordered (its prefix lookups cost per round)."""


def after_calc_priority(result: Any, policy: Any, waiting_queue: Any, *args: Any,
                        **kwargs: Any) -> Any:
    cache = getattr(policy, "tree_cache", None)
    if (not getattr(cache, "is_tokenlake", False) or cache.config.admission != "resident-first"
            or len(waiting_queue) < 2):
        return result
    reorder(cache, waiting_queue, time.perf_counter())
    return result


def reorder(cache: Any, queue: list, now: float) -> None:
    """Put the head of ``queue`` (SGLang's waiting requests) in resident-first order;
    ``now`` on the clock of their ``time_stats.wait_queue_entry_time``."""
    from sglang.srt.mem_cache.radix_cache import RadixKey

    head = queue[:MAX_REORDERED]
    entered, resident = [], []
    for r in head:
        t = r.time_stats.wait_queue_entry_time
        entered.append(t if t > 0 else now)
        key = RadixKey(token_ids=r.origin_input_ids + r.output_ids, extra_key=r.extra_key,
                       cache_salt=r.cache_salt)
        resident.append(cache.resident_tokens(r, key))
    order = resident_first(entered, resident, now, cache.config.admission_max_wait)
    queue[: len(head)] = [head[i] for i in order]
