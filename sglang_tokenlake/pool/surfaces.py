"""What the live pool needs from its worker: the cache host and the KV memory.

The SGLang adapter (``sglang/cache.py``: ``TokenLakeCache`` over SGLang's
``MHATokenToKVPool``) provides both; the unit tests provide fakes. The pool
never imports SGLang.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Optional, Protocol

import torch

from sglang_tokenlake.stats import CacheStats
from sglang_tokenlake.tree import SegmentNode, SegmentTree


class KVStore(Protocol):
    """A worker's KV memory: per-layer K and V buffers ``[slots, kv_heads, head_dim]`` (NHD)."""

    k_buffer: list[torch.Tensor]
    v_buffer: list[torch.Tensor]

    def get_key_buffer(self, layer_id: int) -> torch.Tensor: ...

    def get_value_buffer(self, layer_id: int) -> torch.Tensor: ...


class CacheHost(Protocol):
    """The worker's prefix cache as the pool uses it (all calls on the scheduler thread,
    except ``submit``, which any thread may call)."""

    tree: SegmentTree
    segment_size: int
    q_heads: int
    """Query heads per worker (dispatch's byte counts)."""
    stats: CacheStats
    slot_mutex: threading.Lock
    """Held while tree slots are freed, or read from another thread."""

    def kv_store(self) -> KVStore: ...

    def req_to_token(self) -> torch.Tensor:
        """The request-to-slot table ``[rows, max_context]`` (int32)."""
        ...

    def capacity_tokens(self) -> int:
        """KV slots this worker offers (its allocator's size)."""
        ...

    def free_tokens(self) -> int:
        """KV slots free right now."""
        ...

    def queued_tokens(self) -> int:
        """Prompt tokens of requests waiting to be scheduled (this worker's backlog)."""
        ...

    def running_requests(self) -> int:
        """Requests in the running (decode) batch now: each shipped layer's wait and
        each prefill pass stalls them all."""
        ...

    def alloc_slots(self, n: int) -> Optional[torch.Tensor]:
        """``n`` free slots (evicting if needed), or None."""
        ...

    def drop_nodes(self, nodes: list[SegmentNode]) -> None:
        """Drop these unlocked local copies now and free their slots."""
        ...

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the scheduler thread (any thread may call this)."""
        ...


class PoolView(Protocol):
    """The live pool as its parts see it: members, homes and loads (``PoolLink``)."""

    self_id: str

    def alive(self) -> dict[str, int]:
        """Live members -> capacity in tokens."""
        ...

    def usable(self, owner: str) -> bool:
        """Is ``owner`` alive and not suspected of failing?"""
        ...

    def suspect(self, owner: str) -> None:
        """Avoid ``owner`` for a while: it failed a request."""
        ...

    def designated(self, node: SegmentNode, *, new_copy: bool = False) -> bool:
        """Should this worker's copy of ``node`` be a designated (announced) one?"""
        ...

    def target_of(self, key: int) -> str:
        """Where a copy of ``key`` made here should be kept (placement)."""
        ...

    def loads(self) -> dict[str, float]:
        """Members' backlogs in seconds of queued work (dispatch's balancing weight)."""
        ...

    def horizons(self) -> dict[str, float]:
        """Members' eviction horizons in seconds (``inf``: free room), as last announced."""
        ...

    def age_of(self, clock: int) -> float:
        """Seconds since this worker's tree clock read ``clock``."""
        ...

    def clock_at(self, age: float) -> int:
        """This worker's tree clock ``age`` seconds ago (0 before its oldest reading)."""
        ...
