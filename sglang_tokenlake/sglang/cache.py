"""TokenLakeCache: SGLang's prefix cache (BasePrefixCache) over the segment tree.

How a request's KV row relates to the tree (S = segment size, P = page size, S % P == 0)::

    req_to_token[row]:  | seg 0 | seg 1 | seg 2 | tail < S |
                        '---- tree-owned ----'  '-- request-owned --'
                        0              cache_protected_len

Only full segments enter the tree; the tail is recomputed by the next request
that shares it. ``checkpoint`` inserts the request's full segments, frees the
request's copy of any segment the tree already held (and points the row at the
tree's copy), then moves the request's lock to the deepest node. Nothing else
frees a slot except ``evict``; SGLang's ``release_kv_cache`` frees the
request-owned part of the row.

All methods run on the scheduler thread. Status queries from the broker thread
are queued and answered from ``poll()``, which a scheduler hook calls once per
loop iteration, so the tree and the allocator are only ever touched by one thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    DecLockRefParams,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    InitLoadBackParams,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams

from sglang_tokenlake.config import TokenLakeConfig
from sglang_tokenlake.kvio import merge_runs
from sglang_tokenlake.pool.requests import RequestTable
from sglang_tokenlake.request_log import RequestLog
from sglang_tokenlake.segments import keys_from_bytes, request_namespace, segment_bytes
from sglang_tokenlake.sglang import accounting
from sglang_tokenlake.stats import CacheStats
from sglang_tokenlake.tree import SegmentNode, SegmentTree

if TYPE_CHECKING:
    from sglang_tokenlake.pool import PoolLink

logger = logging.getLogger(__name__)


class _Lookup:
    """A waiting request's key chain, reused while its key stays the same."""

    __slots__ = ("n", "extra", "salt", "last", "keys", "raw", "observed")

    def __init__(self, key: Any, keys: list[int], raw: bytes, observed: bool) -> None:
        self.n, self.extra, self.salt = len(key), key.extra_key, key.cache_salt
        self.last = int(key.token_ids[len(key) - 1])
        self.keys, self.raw, self.observed = keys, raw, observed

    def same_key(self, key: Any) -> bool:
        return (len(key) == self.n and key.extra_key == self.extra
                and key.cache_salt == self.salt and int(key.token_ids[len(key) - 1]) == self.last)


class TokenLakeCache(BasePrefixCache):
    """A segment-level prefix cache with the BasePrefixCache contract."""

    is_tokenlake = True

    def __init__(
        self,
        params: CacheInitParams,
        config: TokenLakeConfig,
        *,
        model_id: str,
    ) -> None:
        if params.page_size <= 0 or config.segment_size % params.page_size:
            raise ValueError(
                f"--tokenlake-segment-size ({config.segment_size}) must be a multiple of "
                f"--page-size ({params.page_size})"
            )
        if params.is_eagle:
            raise ValueError("--cache-backend tokenlake does not support speculative decoding")
        self.disable = False
        self.req_to_token_pool = params.req_to_token_pool
        self.token_to_kv_pool_allocator = params.token_to_kv_pool_allocator
        self.page_size = params.page_size
        self.is_eagle = False
        self.config = config
        self.segment_size = config.segment_size
        self.namespace = config.namespace or model_id
        self.sliding_window_size = None
        alloc = self.token_to_kv_pool_allocator
        dev = getattr(alloc, "device", "cpu") if alloc is not None else "cpu"
        self.device = torch.device(dev) if isinstance(dev, (str, torch.device)) else torch.device("cpu")
        self.stats = CacheStats()
        self.request_log = RequestLog(config.request_log) if config.request_log else None
        self.metrics = None
        if params.enable_metrics:
            self.init_metrics_collector()
            from sglang_tokenlake.sglang.metrics import TokenLakeMetrics

            self.metrics = TokenLakeMetrics(self.metrics_collector.labels)
        self.tree = SegmentTree(self.segment_size, config.policy().eviction)
        self._empty = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.pool: Optional[PoolLink] = None  # attached by the broker service (service.py)
        self.q_heads = 0  # query heads per worker (for dispatch byte costs); set by the factory
        # Per waiting request: its last key chain (SGLang matches a waiting request again
        # at every scheduling round; its tokens do not change meanwhile) and whether
        # hotness counted it.
        self._lookups: RequestTable[_Lookup] = RequestTable()
        self.slot_mutex = threading.Lock()  # held while tree slots are freed or read remotely
        self._wake: Optional[Callable[[], None]] = None  # wakes the scheduler's idle poller
        self._scheduler: Any = None  # SGLang's Scheduler, once it ran a hook
        self._jobs: deque = deque()  # callables queued by the broker thread
        self._last_log = self._last_gauge = time.monotonic()
        self.reset()

    # -- BasePrefixCache: state ---------------------------------------------

    def reset(self) -> None:
        """SGLang's flush_cache (every weight update too): the tree starts empty and the
        allocator takes every slot back. The pool retracts what this worker held, ends
        the leases it granted (they pinned nodes of the old tree) and syncs again."""
        self._lookups.clear()
        if self.pool is not None:
            self.pool.flush(self.tree.reset)
        else:
            with self.slot_mutex:
                self.tree.reset()
        self.root_node = self.tree.root
        self._empty_match = MatchResult(
            device_prefix_len=0,
            last_device_node=self.root_node,
            last_host_node=self.root_node,
            best_match_node=self.root_node,
        )

    def supports_prefix_sharing(self) -> bool:
        return True

    def supports_fast_match_prefix(self) -> bool:  # --tokenlake-match-waiting
        return self.config.match_waiting

    def evictable_size(self) -> int:
        return self.tree.evictable_tokens

    def full_evictable_size(self) -> int:
        return self.tree.evictable_tokens

    def protected_size(self) -> int:
        return self.tree.locked_tokens

    def full_protected_size(self) -> int:
        return self.tree.locked_tokens

    def total_size(self) -> int:
        return self.tree.cached_tokens

    # -- keys ----------------------------------------------------------------

    def _key_chain(self, key: Any) -> tuple[list[int], bytes]:
        """(segment keys, int64 bytes of the full segments) of a RadixKey."""
        tokens = key.raw_token_ids()
        raw = segment_bytes(tokens, self.segment_size, limit=len(key))
        seed = request_namespace(self.namespace, key.extra_key, key.cache_salt)
        return keys_from_bytes(raw, self.segment_size, seed), raw

    # -- BasePrefixCache: lookup ---------------------------------------------

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        key = params.key
        if key.is_bigram:
            raise ValueError("--cache-backend tokenlake does not support bigram (EAGLE) keys")
        if len(key) < self.segment_size:
            return self._empty_match
        req = params.req
        memo = self._lookups.get(req) if req is not None else None
        if memo is None or not memo.same_key(key):
            keys, raw = self._key_chain(key)
            if req is not None:
                memo = _Lookup(key, keys, raw, observed=memo is not None and memo.observed)
                self._lookups.set(req, memo)
        else:
            keys, raw = memo.keys, memo.raw
            self.stats.lookup_memo_hits += 1
        path = self.tree.match(keys, raw if self.config.verify_tokens else None)
        self.stats.lookups += 1
        run = self.pool.transfers.remote_run(keys, raw, len(path)) if self.pool is not None else []
        if run:
            run = self.pool.transfers.plan_run(req, len(key), len(path), run)
        if self.pool is not None and memo is not None and not memo.observed:
            memo.observed = True  # one observation per request, not per scheduling round
            self.pool.observe([n.key for n in path] + [n.key for n in run])
        if not path and not run:
            return self._empty_match
        node = path[-1] if path else self.root_node
        return MatchResult(
            device_prefix_len=len(path) * self.segment_size,
            last_device_node=node,
            last_host_node=node,
            best_match_node=run[-1] if run else node,
            host_hit_length=len(run) * self.segment_size,
        )

    def touch_prefix(self, key: Any) -> None:
        if len(key) >= self.segment_size and not key.is_bigram:
            keys, raw = self._key_chain(key)
            self.tree.match(keys, raw if self.config.verify_tokens else None)

    def path_device_indices(self, node: SegmentNode) -> torch.Tensor:
        """Slots of the path to ``node``; segments not held here (a request ships its
        queries to their owners) read the padding slot 0 and take no memory."""
        chunks: list[torch.Tensor] = []
        local: list[Any] = []
        for n in self.tree.path_to(node):
            if n.value is not None:
                local.append(n.value)
                continue
            chunks += merge_runs(local, self.segment_size)
            local = []
            chunks.append(torch.zeros(self.segment_size, dtype=torch.int64, device=self.device))
        chunks += merge_runs(local, self.segment_size)
        if not chunks:
            return self._empty
        return torch.cat(chunks)

    # -- BasePrefixCache: insert ---------------------------------------------

    def _insert_slots(self, keys: list[int], raw: bytes, slots: torch.Tensor,
                      skip: Any = frozenset()) -> Any:
        """Insert segments ``keys`` whose KV sits in ``slots`` (one slot per token).

        Only the part the tree does not hold yet is copied, once, into a tensor the new nodes
        share as runs ``(base, start)``: a shared prefix is not retained by every insert."""
        S = self.segment_size
        path = self.tree.walk(keys)
        first_new = 0
        while first_new < len(path) and path[first_new].value is not None:
            first_new += 1
        values: list[Any] = [None] * first_new
        if first_new < len(keys):
            base = slots[first_new * S : len(keys) * S].to(dtype=torch.int64, copy=True)
            values += [None if i in skip else (base, (i - first_new) * S)
                       for i in range(first_new, len(keys))]
        out = self.tree.insert(keys, raw, values)
        self.stats.inserted_segments += out.num_new
        return out

    def insert(self, params: InsertParams) -> InsertResult:
        """Insert the full segments of ``params.key`` with slots ``params.value``.

        Returns ``prefix_len``: the tokens (from the start) whose segments the
        tree already held, i.e. the caller's slots there are duplicates to free,
        and the node the insert ended on. Segments past a key collision are not
        inserted (``total_len`` says how far the tree's path reaches).
        """
        keys, raw = self._key_chain(params.key)
        out = self._insert_slots(keys, raw, params.value)
        present = 0
        while present < len(out.adopted) and not out.adopted[present]:
            present += 1
        last = out.path[-1] if out.path else self.root_node
        S = self.segment_size
        return InsertResult(prefix_len=present * S, total_len=len(out.path) * S,
                            last_device_node=last)

    def checkpoint(self, req: Any, *, up_to: int, **kwargs: Any) -> None:
        """Insert the request's full segments in ``[0, up_to)`` and re-anchor its lock."""
        S = self.segment_size
        kv = req.kv
        protected = kv.cache_protected_len
        n_seg = up_to // S
        if n_seg * S <= protected:
            return
        from sglang.srt.mem_cache.radix_cache import RadixKey

        token_ids = req.full_untruncated_fill_ids[: n_seg * S]
        key = RadixKey(token_ids, req.extra_key, cache_salt=req.cache_salt)
        keys, raw = self._key_chain(key)
        seed = request_namespace(self.namespace, key.extra_key, key.cache_salt)
        row = self.req_to_token_pool.req_to_token[kv.req_pool_idx]
        plan = self.pool.remote.plan_of(req) if self.pool is not None else None
        remote = {idx for idx, _ in plan.segments()} if plan is not None else set()
        out = self._insert_slots(keys, raw, row[: n_seg * S], skip=remote)
        if self.pool is not None:
            self.pool.on_inserted(keys, out, seed)

        # The request computed segments the tree already held: free its copies
        # and point the row at the tree's.
        dup_ranges = []
        for i in range(protected // S, len(out.path)):
            if not out.adopted[i] and i not in remote:
                dup_ranges.append((i * S, (i + 1) * S))
        if dup_ranges:
            self.free_kv_row(kv, dup_ranges)
            for a, b in dup_ranges:
                base, off = out.path[a // S].value
                self.req_to_token_pool.write((kv.req_pool_idx, slice(a, b)), base[off : off + S])
        self.stats.duplicate_segments += len(dup_ranges)

        new_len = len(out.path) * S
        if new_len <= protected:
            return  # a key collision cut the path short; the row stays request-owned
        kv.cache_protected_len = new_len
        kv.cache_inserted_len = max(kv.cache_inserted_len, new_len)
        node = out.path[-1]
        self.unlock(req.lock)
        req.lock = self.lock(node)
        req.last_node = node
        if self.config.check_integrity:
            self.check_integrity()

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        self._lookups.pop(req)
        served = self.pool.forget(req) if self.pool is not None else None
        if req.finished():
            prompt = len(req.origin_input_ids)
            hit = self.stats.finish(prompt, req.cached_tokens)
            if self.metrics is not None:
                self.metrics.observe_request(hit, prompt - hit)
            if self.request_log is not None:
                self.request_log.write(req.rid, self.pool and self.pool.self_id, prompt, hit, served)

    # -- BasePrefixCache: locks and eviction ----------------------------------

    def inc_lock_ref(self, node: SegmentNode) -> IncLockRefResult:
        return IncLockRefResult(delta=-self.tree.lock(node))

    def dec_lock_ref(
        self, node: SegmentNode, params: Optional[DecLockRefParams] = None
    ) -> DecLockRefResult:
        return DecLockRefResult(delta=self.tree.unlock(node))

    def evict(self, params: EvictParams) -> EvictResult:
        start = time.perf_counter()
        hooks = self.pool.eviction_hooks() if self.pool is not None else {}
        if self.pool is not None:
            self.pool.before_free(params.num_tokens)
        with self.slot_mutex:
            dropped = self.tree.evict(params.num_tokens, **hooks)
            if dropped:
                runs = merge_runs([v for _, v in dropped], self.segment_size)
                self.token_to_kv_pool_allocator.free(torch.cat(runs))
        if dropped and self.pool is not None:
            self.pool.on_evicted([n for n, _ in dropped])
        n = len(dropped) * self.segment_size
        self.stats.count_evicted([node for node, _ in dropped])
        self.update_eviction_metrics(n, start)
        if self.config.check_integrity and dropped:
            self.check_integrity()
        return EvictResult(num_tokens_evicted=n)

    def init_load_back(self, params: InitLoadBackParams) -> Optional[tuple[int, Any]]:
        """Bring in the remote run ``match_prefix`` promised (see Transfers.load_back).

        All or nothing: on a failure nothing is committed and the request recomputes
        those tokens, or (None) waits for a later round when segments were gone.
        """
        req = params.req
        device_node = req.last_node if req is not None else self.root_node
        if self.pool is None or req is None:
            self.stats.pull_fallbacks += 1
            return 0, device_node
        return self.pool.transfers.load_back(req, params.best_match_node, device_node,
                                   params.host_hit_length)

    def alloc_slots(self, n: int) -> Optional[torch.Tensor]:
        """``n`` free KV slots (page-aligned; n a multiple of the page size), evicting if needed."""
        alloc = self.token_to_kv_pool_allocator
        if alloc.available_size() < n:
            self.evict(EvictParams(num_tokens=n - alloc.available_size()))
        if alloc.available_size() < n:
            return None
        return alloc.alloc(n)

    def drop_nodes(self, nodes: list[SegmentNode]) -> None:
        """Drop these unlocked local copies now and free their slots."""
        with self.slot_mutex:
            values = [self.tree.drop(n) for n in nodes]
            self.token_to_kv_pool_allocator.free(torch.cat(merge_runs(values, self.segment_size)))
        self.stats.count_evicted(nodes)

    # -- inspection ------------------------------------------------------------

    def check_integrity(self, kvs: Optional[Any] = None) -> dict[str, int]:
        """Check the tree's slots against the allocator and return the accounting, with
        ``held_by_requests`` measured from the live requests' rows (``kvs``: their KV
        records; default: the attached scheduler's). See sglang/accounting.py."""
        return accounting.check(self, kvs)

    def status(self) -> dict[str, Any]:
        acct = self.check_integrity()
        return {
            "segment_size": self.segment_size,
            "page_size": self.page_size,
            "namespace": self.namespace,
            "local_segments": self.tree.local_nodes,
            "known_segments": sum(1 for _ in self.tree.iter_nodes()),
            "memory": acct,
            "stats": self.stats.as_dict(),
            "pool": self.pool.status() if self.pool is not None else None,
        }

    def pretty_print(self) -> None:
        accounting.print_tree(self)

    # -- what the pool needs (pool.surfaces.CacheHost) -------------------------------

    def kv_store(self) -> Any:
        return self.token_to_kv_pool_allocator.get_kvcache()

    def req_to_token(self) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token

    def capacity_tokens(self) -> int:
        return int(self.token_to_kv_pool_allocator.size)

    def free_tokens(self) -> int:
        return int(self.token_to_kv_pool_allocator.available_size())

    def queued_tokens(self) -> int:
        queue = getattr(self._scheduler, "waiting_queue", None) or ()
        return sum(len(r.origin_input_ids) for r in queue)

    def running_requests(self) -> int:
        return len(getattr(getattr(self._scheduler, "running_batch", None), "reqs", None) or ())

    # -- scheduler-thread work ---------------------------------------------------

    def submit(self, fn: Any) -> None:
        """Queue ``fn()`` to run on the scheduler thread (called from other threads)."""
        self._jobs.append(fn)
        if self._wake is not None:
            self._wake()

    def attach_scheduler(self, scheduler: Any) -> None:
        """Let queued work wake an idle scheduler (``--sleep-on-idle`` polls its sockets)."""
        self._scheduler = scheduler
        sleeper = getattr(scheduler, "idle_sleeper", None)
        if sleeper is None or self._wake is not None:
            return
        import zmq

        from sglang_tokenlake.transport.wake import Waker

        waker = Waker(zmq.Context.instance())
        sleeper.poller.register(waker.socket, zmq.POLLIN)
        self._waker = waker
        self._wake = waker.wake

    def poll(self) -> None:
        """Run queued jobs and periodic logging; called once per scheduler iteration."""
        if self._wake is not None:
            self._waker.drain()
        while self._jobs:
            fn = self._jobs.popleft()
            try:
                fn()
            except Exception:  # a failed job must never take the scheduler down
                logger.exception("TokenLake: scheduler-thread job failed")
        if self.pool is not None:
            self.pool.poll()
        now = time.monotonic()
        if now - self._last_gauge >= 1.0:
            self._last_gauge = now
            self._lookups.sweep()  # requests dropped without a release
        if self.metrics is not None and now == self._last_gauge:
            self.metrics.set_occupancy(self.tree.cached_tokens, self.tree.local_nodes)
            if self.pool is not None:
                self.metrics.observe_pool(self.pool.counters)
                self.metrics.observe_calibration(self.pool.calibration.snapshot())
        interval = self.config.log_interval
        if interval > 0 and now - self._last_log >= interval:
            self._last_log = now
            accounting.log_stats(self)
