"""A scheduler stand-in that drives a prefix cache the way SGLang's scheduler does.

It uses SGLang's real ReqToTokenPool, KV allocators and ReqKvInfo, and follows
the scheduler's contract step by step: match_prefix -> lock -> allocate the
row (prefix from the tree, the rest fresh) -> extend/decode -> checkpoint ->
release (``sglang.srt.mem_cache.common.release_kv_cache``: free the row from
``cache_protected_len`` on, unlock, free the row).
"""

from __future__ import annotations

from array import array
from typing import Optional

import torch
from sglang.srt.managers.schedule_batch import ReqKvInfo
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey


def radix_key(tokens: list[int], extra_key: Optional[str] = None,
              salt: Optional[str] = None) -> RadixKey:
    """SGLang's key of ``tokens`` (with its namespace parts)."""
    return RadixKey(array("q", tokens), extra_key, cache_salt=salt)


class FakeReq:
    def __init__(self, rid: str, tokens: list[int], extra_key: Optional[str] = None,
                 cache_salt: Optional[str] = None) -> None:
        self.rid = rid
        self.origin_input_ids = array("q", tokens)
        self.output_ids = array("q")
        self.full_untruncated_fill_ids = array("q", tokens)
        self.extra_key = extra_key
        self.cache_salt = cache_salt
        self.kv = ReqKvInfo()
        self.lock = None
        self.last_node = None
        self.prefix_len = 0
        self.cached_tokens = 0
        self._finished = False

    def finished(self) -> bool:
        return self._finished


def make_pools(capacity: int, page_size: int = 1, rows: int = 64, max_ctx: int = 4096):
    req_pool = ReqToTokenPool(rows, max_ctx, "cpu", False)
    if page_size == 1:
        alloc = TokenToKVPoolAllocator(capacity, torch.float32, "cpu", None, need_sort=False)
    else:
        alloc = PagedTokenToKVPoolAllocator(capacity, page_size, torch.float32, "cpu", None,
                                            need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=req_pool,
                             token_to_kv_pool_allocator=alloc, page_size=page_size)
    return params, req_pool, alloc


class MiniScheduler:
    def __init__(self, cache, req_pool: ReqToTokenPool, alloc) -> None:
        self.cache = cache
        self.req_pool = req_pool
        self.alloc = alloc
        self.ps = alloc.page_size
        self.running: list[FakeReq] = []

    def _alloc(self, n: int) -> torch.Tensor:
        n = -(-n // self.ps) * self.ps
        if n == 0:
            return torch.empty((0,), dtype=torch.int64)
        if self.alloc.available_size() < n:
            self.cache.evict(EvictParams(num_tokens=n - self.alloc.available_size()))
        out = self.alloc.alloc(n)
        if out is None:
            raise MemoryError(f"cannot allocate {n} tokens")
        return out

    def admit(self, req: FakeReq) -> int:
        tokens = req.full_untruncated_fill_ids
        # SGLang computes at least the last prompt token: match at most len - 1.
        key = RadixKey(tokens, req.extra_key, limit=len(tokens) - 1, cache_salt=req.cache_salt)
        m = self.cache.match_prefix(MatchPrefixParams(key=key, req=req))
        req.prefix_len = m.device_prefix_len
        req.last_node = m.last_device_node
        req.lock = self.cache.lock(req.last_node)
        prefix = self.cache.prefix_device_indices(req)
        new = self._alloc(len(tokens) - req.prefix_len)
        (row,) = self.req_pool.alloc_rows(1)
        req.kv.req_pool_idx = row
        self.req_pool.write((row, slice(0, req.prefix_len)), prefix)
        self.req_pool.write((row, slice(req.prefix_len, req.prefix_len + len(new))), new)
        req.kv.cache_protected_len = req.prefix_len
        req.kv.kv_committed_len = len(tokens)
        req.kv.kv_allocated_len = req.prefix_len + len(new)
        req.cached_tokens = req.prefix_len
        self.running.append(req)
        return req.prefix_len

    def decode(self, req: FakeReq, new_tokens: list[int]) -> None:
        for t in new_tokens:
            if req.kv.kv_committed_len == req.kv.kv_allocated_len:
                more = self._alloc(1)
                start = req.kv.kv_allocated_len
                self.req_pool.write((req.kv.req_pool_idx, slice(start, start + len(more))), more)
                req.kv.kv_allocated_len += len(more)
            req.output_ids.append(t)
            req.full_untruncated_fill_ids.append(t)
            req.kv.kv_committed_len += 1

    def checkpoint(self, req: FakeReq) -> None:
        self.cache.checkpoint(req, up_to=req.kv.kv_committed_len)

    def row(self, req: FakeReq) -> torch.Tensor:
        return self.req_pool.req_to_token[req.kv.req_pool_idx, : req.kv.kv_committed_len].clone()

    def finish(self, req: FakeReq, checkpoint: bool = True) -> None:
        req._finished = True
        kv = req.kv
        owned = kv.kv_committed_len
        if checkpoint:
            self.cache.checkpoint(req, up_to=owned)
        self.cache.free_kv_row(kv, [(kv.cache_protected_len, owned)])
        self.cache.unlock(req.lock)
        req.lock = None
        start = -(-owned // self.ps) * self.ps
        if start < kv.kv_allocated_len:
            self.cache.free_kv_row(kv, [(start, kv.kv_allocated_len)])
        self.cache.on_release(req, checkpointed=checkpoint)
        self.req_pool.free_rows([kv.req_pool_idx])
        kv.req_pool_idx = None
        kv.mark_kv_released()
        self.running.remove(req)

    def held_by_running(self) -> int:
        """Slots the running requests own outside the tree."""
        return sum(r.kv.kv_allocated_len - r.kv.cache_protected_len for r in self.running)


def assert_invariant(cache, sched: MiniScheduler) -> None:
    """free + cached + held by requests == capacity, and the tree is self-consistent.

    Three independent counts: the allocator's free list, the tree's slots, and the
    slots the running requests' rows reference outside the tree (measured from
    req_to_token); the requests' own lengths must agree with the last."""
    acct = cache.check_integrity([r.kv for r in sched.running])
    assert acct["held_by_requests"] == sched.held_by_running(), acct
    assert acct["free"] + acct["cached"] + acct["held_by_requests"] == acct["capacity"], acct
    assert acct["held_derived"] == acct["held_by_requests"] and acct["unaccounted"] == 0, acct
    assert acct["cached"] == acct["locked"] + acct["evictable"], acct
    if not sched.running:
        assert acct["locked"] == 0, acct
