"""Hooks of query-centric attention inside SGLang's scheduler and attention backends.

* ``Scheduler.run_batch`` (around): tells the pool's ``RemoteAttention`` which
  requests of the batch have a remote plan, for the duration of the pass.
* the attention backends' ``forward_extend`` / ``forward_decode`` (after):
  replace those requests' attention outputs by the merge of their local
  partial and the owners' partials (pool/remote.py).
* ``Scheduler.process_batch_result`` (around): a request whose owner failed
  during the pass commits nothing and is retracted.

The engine is found through the objects SGLang hands the hooks: the scheduler's
cache (``tree_cache.pool.remote``) and the attention backend's KV pool, which the
pool service binds the engine to (``ENGINE_ATTR``): no process-wide global.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from sglang_tokenlake.pool.remote import RemoteAttention

ENGINE_ATTR = "tokenlake_remote"  # attribute of the KV pool: its RemoteAttention


def _engine(scheduler: Any) -> Optional[RemoteAttention]:
    """The query-shipping engine of this scheduler's TokenLake pool, if any."""
    pool = getattr(getattr(scheduler, "tree_cache", None), "pool", None)
    return pool.remote if pool is not None else None


def _prefill_tokens(scheduler: Any, batch: Any) -> int:
    """Tokens an extend pass prefills, when its wall time is its compute time (no
    overlap scheduling: run_batch returns when the pass is done); else 0."""
    if getattr(scheduler, "enable_overlap", True):
        return 0
    mode = getattr(batch, "forward_mode", None)
    if mode is None or not mode.is_extend():
        return 0
    return int(getattr(batch, "extend_num_tokens", 0) or 0)


def around_run_batch(original: Any, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    pool = getattr(getattr(scheduler, "tree_cache", None), "pool", None)
    if pool is None:
        return original(scheduler, batch, *args, **kwargs)
    eng = pool.remote
    tokens = _prefill_tokens(scheduler, batch)
    started = time.perf_counter()
    shipping = bool(eng.plans)
    if shipping:
        eng.begin_forward(batch)
    try:
        return original(scheduler, batch, *args, **kwargs)
    finally:
        if shipping:
            eng.end_forward(batch)
        # Dispatch's prefill cost and pass time, from this worker's own passes (their wall
        # time is their compute time only without overlap scheduling).
        if not shipping and not getattr(scheduler, "enable_overlap", True):
            elapsed = time.perf_counter() - started
            pool.calibration.observe_pass(elapsed)
            if tokens:
                pool.calibration.observe_prefill(tokens, elapsed)


def around_process_batch_result(original: Any, scheduler: Any, batch: Any, *args: Any,
                                 **kwargs: Any) -> Any:
    eng = _engine(scheduler)
    if eng is None or not any(b is batch for b, _ in eng.pending_retract):
        return original(scheduler, batch, *args, **kwargs)
    # A request of this batch lost an owner mid-pass: its token must not be
    # committed. The prefill result loop skips retracted requests; the decode
    # loop does so only when overlap scheduling is on, so this one call gets a
    # (frozen, stateless) result processor that says so.
    import dataclasses

    proc = getattr(scheduler, "batch_result_processor", None)
    forced = proc is not None and not proc.enable_overlap
    if forced:
        scheduler.batch_result_processor = dataclasses.replace(proc, enable_overlap=True)
    try:
        return original(scheduler, batch, *args, **kwargs)
    finally:
        if forced:
            scheduler.batch_result_processor = proc
        eng.retract_failed(scheduler, batch)


def attention_hook(decode: bool, apply_cap: bool) -> Any:
    def hook(original: Any, backend: Any, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any,
             *args: Any, **kwargs: Any) -> Any:
        o = original(backend, q, k, v, layer, forward_batch, *args, **kwargs)
        # The engine is bound to the KV pool it serves (service.py), not to the process.
        eng = getattr(getattr(backend, "token_to_kv_pool", None), ENGINE_ATTR, None)
        if eng is not None and eng.active and not getattr(layer, "is_cross_attention", False):
            eng.replace_outputs(q, o, layer, forward_batch, decode, apply_cap)
        return o

    return hook
