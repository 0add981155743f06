"""Slot accounting of a TokenLake cache, from independent sources; its tree dump and
statistics line.

Every KV slot (counted in pages) is in exactly one of: the allocator's free
list, the segment tree (``cached``), or a live request's req_to_token row past
the tree's part (``held_by_requests``). The first two come from the allocator
and the tree; the third is *measured* here from the rows of the requests that
own one, so ``free + cached + held_by_requests == capacity`` is a real check:
a slot that nobody references (a leak) or that two owners share makes it fail.
``held_derived`` (``capacity - free - cached``) is reported next to it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Optional

import torch

from sglang_tokenlake.kvio import merge_runs

logger = logging.getLogger(__name__)


def tree_slots(cache: Any) -> Optional[torch.Tensor]:
    """The slots of every local segment of the tree (None when it holds none)."""
    values = [n.value for n in cache.tree.iter_nodes() if n.value is not None]
    if not values:
        return None
    return torch.cat(merge_runs(values, cache.segment_size))


def owner_kvs(scheduler: Any) -> list[Any]:
    """The KV records (``req.kv``) of the requests that own a req_to_token row now:
    the last and the running batch and the request parked between prefill chunks
    (what SGLang's own invariant checker walks)."""
    if scheduler is None:
        return []
    checker = getattr(scheduler, "invariant_checker", None)
    owners = getattr(checker, "_requests_owning_rows", None)
    if owners is not None:
        return [r.kv for r in owners()]
    reqs: list[Any] = []
    for batch in (getattr(scheduler, "last_batch", None), getattr(scheduler, "running_batch", None)):
        reqs += list(getattr(batch, "reqs", None) or ())
    chunked = getattr(scheduler, "chunked_req", None)
    if chunked is not None:
        reqs.append(chunked)
    seen: set[int] = set()
    out = []
    for r in reqs:
        if id(r.kv) not in seen and r.kv.req_pool_idx is not None:
            seen.add(id(r.kv))
            out.append(r.kv)
    return out


def held_pages(req_to_token: torch.Tensor, kvs: Iterable[Any], page_size: int,
               exclude: Optional[torch.Tensor]) -> torch.Tensor:
    """Distinct pages the rows of ``kvs`` reference (``[0, kv_allocated_len)``), less
    the pages in ``exclude`` (the tree's) and the padding page 0 (positions of
    segments whose queries are shipped to their owners read slot 0)."""
    rows = [req_to_token[kv.req_pool_idx, : kv.kv_allocated_len]
            for kv in kvs if kv.req_pool_idx is not None and kv.kv_allocated_len > 0]
    if not rows:
        return torch.empty((0,), dtype=torch.int64)
    pages = torch.unique(torch.cat(rows).to(torch.int64) // page_size)
    pages = pages[pages != 0]
    if exclude is not None and exclude.numel():
        pages = pages[~torch.isin(pages, torch.unique(exclude.to(torch.int64) // page_size))]
    return pages


def check(cache: Any, kvs: Optional[Iterable[Any]] = None) -> dict[str, int]:
    """Check the tree's counters and slots against the allocator; return the accounting.

    ``kvs``: the KV records of the requests owning rows (default: those of the
    scheduler the cache is attached to). Asserts what must hold at any moment
    (tree slots distinct, not free, not the padding slot); the balance
    ``free + cached + held_by_requests == capacity`` holds between scheduler
    iterations and is left to the caller (``unaccounted`` is its difference).
    """
    cache.tree.check()
    alloc = cache.token_to_kv_pool_allocator
    ps = cache.page_size
    cached = cache.tree.cached_tokens
    slots = tree_slots(cache)
    if slots is not None:
        assert slots.numel() == cached, (slots.numel(), cached)
        assert torch.unique(slots).numel() == cached, "a slot is held by two segments"
        assert not bool((slots == 0).any()), "the padding slot 0 is in the tree"
        free = alloc.get_all_free_pages()
        if free is not None and free.numel():
            stale = torch.isin(torch.unique(slots // ps), free)
            assert not bool(stale.any()), "a slot held by the tree is in the free list"
    if kvs is None:
        kvs = owner_kvs(cache._scheduler)
    held = int(held_pages(cache.req_to_token_pool.req_to_token, kvs, ps, slots).numel()) * ps
    capacity = int(alloc.size)
    available = int(alloc.available_size())
    derived = capacity - available - cached
    return {
        "capacity": capacity,
        "free": available,
        "cached": cached,
        "locked": cache.tree.locked_tokens,
        "evictable": cache.tree.evictable_tokens,
        "held_by_requests": held,
        "held_derived": derived,
        "unaccounted": derived - held,
    }


def print_tree(cache: Any) -> None:
    """Print the cache's segment tree, one node per line (``pretty_print``)."""
    stack = [(c, 1) for c in cache.tree.root.children.values()]
    while stack:
        node, depth = stack.pop()
        print("  " * depth, f"seg {node.depth} key={node.key:#018x}",
              f"local={node.is_local} lock={node.lock_ref} hits={node.hits}")
        stack.extend((c, depth + 1) for c in node.children.values())
    print(f"#tokens: {cache.total_size()}")


def log_stats(cache: Any) -> None:
    """One line of the cache's statistics in the server log (``--tokenlake-log-interval``)."""
    s = cache.stats
    logger.info(
        "TokenLake cache: hit_tokens=%d miss_tokens=%d hit_rate=%.1f%% cached=%d/%d tokens "
        "segments=%d evicted=%d",
        s.hit_tokens, s.miss_tokens, 100.0 * s.hit_rate, cache.tree.cached_tokens,
        int(cache.token_to_kv_pool_allocator.size), cache.tree.local_nodes, s.evicted_segments,
    )
