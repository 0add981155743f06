"""TokenLakeCache against SGLang's real pools, driven like the scheduler drives it.

Every scenario ends with the memory invariant: free + cached + held == capacity.
"""

import random

import pytest
import torch
from cache_harness import FakeReq, MiniScheduler, assert_invariant, make_pools
from cache_harness import radix_key as _key

from sglang_tokenlake.config import TokenLakeConfig
from sglang_tokenlake.sglang.cache import TokenLakeCache


def make(capacity=256, page_size=1, segment_size=8, **cfg):
    params, req_pool, alloc = make_pools(capacity, page_size)
    cache = TokenLakeCache(params, TokenLakeConfig(segment_size=segment_size, **cfg), model_id="m")
    return cache, MiniScheduler(cache, req_pool, alloc), alloc


def free_set(alloc) -> set[int]:
    return set(alloc.get_all_free_pages().tolist())


def test_full_segments_are_cached_and_the_tail_is_freed():
    cache, sched, alloc = make(capacity=256, segment_size=8)
    r = FakeReq("a", list(range(1, 21)))  # 20 tokens: 2 segments + tail of 4
    assert sched.admit(r) == 0
    row = sched.row(r)
    sched.finish(r)
    assert cache.total_size() == 16
    path = cache.tree.match(*cache._key_chain(_key(list(range(1, 21)))))
    assert torch.equal(cache.path_device_indices(path[-1]), row[:16])
    # The tail's 4 slots went back to the allocator; the tree's 16 did not.
    assert set(row[16:].tolist()) <= free_set(alloc)
    assert not set(row[:16].tolist()) & free_set(alloc)
    assert alloc.available_size() == 256 - 16
    assert_invariant(cache, sched)


def test_shared_prefix_hits_segment_aligned_and_reuses_exact_slots():
    cache, sched, alloc = make(segment_size=8)
    a = FakeReq("a", list(range(1, 30)))
    sched.admit(a)
    sched.finish(a)
    tree_slots = cache.path_device_indices(cache.tree.match(*cache._key_chain(_key(list(range(1, 30))))) [-1])
    b = FakeReq("b", list(range(1, 20)) + [99] * 10)  # shares 19 tokens: 2 full segments
    assert sched.admit(b) == 16
    assert b.cached_tokens == 16
    assert torch.equal(sched.row(b)[:16], tree_slots[:16])
    assert_invariant(cache, sched)
    sched.finish(b)
    assert_invariant(cache, sched)


def test_concurrent_duplicate_is_freed_and_row_repointed():
    cache, sched, alloc = make(segment_size=8)
    toks = list(range(1, 26))
    a, b = FakeReq("a", toks), FakeReq("b", toks)
    sched.admit(a)
    sched.admit(b)  # both compute the same 3 segments
    row_a, row_b = sched.row(a), sched.row(b)
    sched.finish(a)
    free_before = alloc.available_size()
    sched.checkpoint(b)  # b inserts: the tree already has a's copy
    # b's 24 duplicate slots are free again; b's row now points at a's slots.
    assert alloc.available_size() == free_before + 24
    assert set(row_b[:24].tolist()) <= free_set(alloc)
    assert torch.equal(sched.row(b)[:24], row_a[:24])
    assert b.kv.cache_protected_len == 24
    assert_invariant(cache, sched)
    sched.finish(b)
    assert cache.stats.duplicate_segments == 3
    assert_invariant(cache, sched)


def test_eviction_is_lru_leaf_first_and_frees_exact_slots():
    cache, sched, alloc = make(capacity=64, segment_size=8)
    x = FakeReq("x", [1] * 8 + [2] * 8 + [3] * 8 + [0])
    y = FakeReq("y", [1] * 8 + [5] * 8 + [0])
    for r in (x, y):
        sched.admit(r)
        sched.finish(r)
    x_row_slots = cache.path_device_indices(cache.tree.match(*cache._key_chain(_key([1] * 8 + [2] * 8 + [3] * 8)))[-1])
    # Touch y so x's leaf is the least recently used.
    cache.tree.match(*cache._key_chain(_key([1] * 8 + [5] * 8)))
    assert cache.total_size() == 32
    before = free_set(alloc)
    cache.evict(__import__("sglang.srt.mem_cache.base_prefix_cache", fromlist=["EvictParams"]).EvictParams(num_tokens=8))
    assert free_set(alloc) - before == set(x_row_slots[16:24].tolist())
    assert cache.total_size() == 24
    assert_invariant(cache, sched)


def test_locked_prefix_survives_memory_pressure():
    cache, sched, alloc = make(capacity=64, segment_size=8)
    a = FakeReq("a", list(range(1, 34)))  # 4 segments (32 tokens) + 1
    sched.admit(a)
    sched.finish(a)
    b = FakeReq("b", list(range(1, 33)) + [77])
    assert sched.admit(b) == 32  # b locks all 4 segments
    big = FakeReq("c", [9] * 40)
    with pytest.raises(MemoryError):
        sched.admit(big)  # nothing evictable: the locked prefix must stay
    assert cache.total_size() == 32
    sched.finish(b)
    assert_invariant(cache, sched)
    assert sched.admit(FakeReq("d", [9] * 40)) == 0  # now eviction makes room
    assert_invariant(cache, sched)


@pytest.mark.parametrize("kw", [{"salt": "t1"}, {"extra_key": "lora-a"}])
def test_namespaces_never_hit_each_other(kw):
    cache, sched, alloc = make(segment_size=8)
    toks = list(range(1, 30))
    a = FakeReq("a", toks, extra_key=kw.get("extra_key"), cache_salt=kw.get("salt"))
    sched.admit(a)
    sched.finish(a)
    assert sched.admit(FakeReq("b", toks)) == 0
    assert sched.admit(FakeReq("c", toks, extra_key=kw.get("extra_key"), cache_salt=kw.get("salt"))) == 24
    other = {"salt": "t2"} if "salt" in kw else {"extra_key": "lora-b"}
    assert sched.admit(FakeReq("d", toks, extra_key=other.get("extra_key"), cache_salt=other.get("salt"))) == 0
    for r in list(sched.running):
        sched.finish(r)
    assert_invariant(cache, sched)


def test_paged_pool_and_chunked_checkpoints():
    cache, sched, alloc = make(capacity=512, page_size=16, segment_size=32)
    toks = list(range(1, 90))  # 89 tokens: 2 segments of 32 + tail 25
    r = FakeReq("a", toks)
    sched.admit(r)
    r.kv.kv_committed_len = 40  # a chunked prefill checkpoints after 40 tokens
    sched.checkpoint(r)
    assert r.kv.cache_protected_len == 32 and cache.total_size() == 32
    r.kv.kv_committed_len = len(toks)
    sched.decode(r, [5, 6, 7, 8, 9, 10, 11, 12])  # 97 tokens: 3 segments
    sched.finish(r)
    assert cache.total_size() == 96
    assert alloc.available_size() == 512 - 96
    b = FakeReq("b", toks + [5, 6, 7, 8, 9, 10, 11, 12, 13])
    assert sched.admit(b) == 96  # output tokens are cached too
    sched.finish(b)
    assert_invariant(cache, sched)


def test_segment_size_must_be_a_page_multiple():
    params, _, _ = make_pools(64, page_size=16)
    with pytest.raises(ValueError, match="multiple of --page-size"):
        TokenLakeCache(params, TokenLakeConfig(segment_size=24), model_id="m")


def test_hits_equal_stock_radix_cache_when_segment_is_page():
    """With segment size == page size, every hit length equals SGLang's RadixCache."""
    from sglang.srt.mem_cache.radix_cache import RadixCache

    ps = 8
    params, req_pool, alloc = make_pools(4096, ps)
    tl = TokenLakeCache(params, TokenLakeConfig(segment_size=ps), model_id="m")
    p2, rp2, al2 = make_pools(4096, ps)
    stock = RadixCache(p2)
    s1, s2 = MiniScheduler(tl, req_pool, alloc), MiniScheduler(stock, rp2, al2)
    rng = random.Random(3)
    bases = [[rng.randrange(1, 50) for _ in range(rng.randint(10, 60))] for _ in range(6)]
    hits = []
    for i in range(120):
        toks = rng.choice(bases)[: rng.randint(5, 60)] + [rng.randrange(1, 50) for _ in range(rng.randint(1, 30))]
        ra, rb = FakeReq(f"a{i}", toks), FakeReq(f"b{i}", toks)
        ra.priority = rb.priority = 0
        h1, h2 = s1.admit(ra), s2.admit(rb)
        assert h1 == h2, (i, h1, h2)
        hits.append(h1)
        out = [rng.randrange(1, 50) for _ in range(rng.randint(0, 12))]
        s1.decode(ra, out)
        s2.decode(rb, out)
        s1.finish(ra)
        s2.finish(rb)
    assert sum(hits) > 0
    assert_invariant(tl, s1)


def test_random_soak_keeps_the_invariant():
    cache, sched, alloc = make(capacity=384, page_size=4, segment_size=8)
    rng = random.Random(11)
    bases = [[rng.randrange(1, 100) for _ in range(64)] for _ in range(8)]
    for step in range(600):
        if sched.running and (rng.random() < 0.45 or len(sched.running) > 5):
            r = rng.choice(sched.running)
            if rng.random() < 0.3:
                sched.checkpoint(r)
            else:
                sched.decode(r, [rng.randrange(1, 100) for _ in range(rng.randint(0, 6))])
                sched.finish(r, checkpoint=rng.random() < 0.9)
        else:
            toks = rng.choice(bases)[: rng.randint(1, 64)] + [rng.randrange(1, 100) for _ in range(rng.randint(1, 20))]
            try:
                sched.admit(FakeReq(f"r{step}", toks, cache_salt=rng.choice([None, None, "t"])))
            except MemoryError:
                pass
        assert_invariant(cache, sched)
    for r in list(sched.running):
        sched.finish(r)
    assert_invariant(cache, sched)
    assert cache.stats.evicted_segments > 0
    cache.evict(__import__("sglang.srt.mem_cache.base_prefix_cache", fromlist=["EvictParams"]).EvictParams(num_tokens=10**9))
    assert alloc.available_size() == 384


@pytest.mark.parametrize("page_size", [1, 4])
def test_accounting_measures_held_slots_and_catches_a_leak(page_size):
    """held_by_requests is measured from the live rows, not derived from the rest:
    a slot no request and no segment references breaks the balance."""
    cache, sched, alloc = make(capacity=256, page_size=page_size, segment_size=8)
    a = FakeReq("a", list(range(1, 30)))
    sched.admit(a)
    sched.checkpoint(a)  # 3 segments to the tree, the tail stays the request's
    acct = cache.check_integrity([a.kv])
    assert acct["held_by_requests"] == sched.held_by_running() > 0
    assert_invariant(cache, sched)
    leaked = alloc.alloc(page_size)  # held by nobody
    assert leaked is not None
    acct = cache.check_integrity([a.kv])
    assert acct["unaccounted"] == page_size and acct["held_derived"] == acct["held_by_requests"] + page_size
    with pytest.raises(AssertionError):
        assert_invariant(cache, sched)
    alloc.free(leaked)
    sched.finish(a)
    assert_invariant(cache, sched)


def test_accounting_catches_a_row_slot_that_was_freed():
    """A live row pointing at a freed slot (a use-after-free) is counted held, so the
    free list and the rows together overshoot the capacity."""
    cache, sched, alloc = make(capacity=256, segment_size=8)
    a = FakeReq("a", list(range(1, 13)))  # 1 segment + a tail of 4
    sched.admit(a)
    tail = sched.row(a)[8:]
    alloc.free(tail[:1])
    acct = cache.check_integrity([a.kv])
    assert acct["unaccounted"] == -1
    with pytest.raises(AssertionError):
        assert_invariant(cache, sched)


def test_accounting_reads_the_attached_schedulers_live_requests():
    """In a server the live requests come from SGLang's scheduler (its invariant checker's
    row owners, else its batches and the chunked request)."""
    from types import SimpleNamespace

    cache, sched, alloc = make(capacity=256, segment_size=8)
    a, b = FakeReq("a", list(range(1, 13))), FakeReq("b", list(range(50, 70)))
    sched.admit(a)
    sched.admit(b)
    cache._scheduler = SimpleNamespace(last_batch=SimpleNamespace(reqs=[a]),
                                       running_batch=SimpleNamespace(reqs=[a]), chunked_req=b)
    acct = cache.check_integrity()
    assert acct["held_by_requests"] == sched.held_by_running() == acct["held_derived"]
    cache._scheduler = SimpleNamespace(
        invariant_checker=SimpleNamespace(_requests_owning_rows=lambda: [a]))
    assert cache.check_integrity()["unaccounted"] == b.kv.kv_allocated_len


def test_a_waiting_request_matched_again_reuses_its_key_chain():
    # The scheduler matches a waiting request every round; its chain is hashed once,
    # and a longer key (the request grew) or another request is hashed afresh.
    cache, sched, alloc = make(capacity=256, segment_size=8)
    done = FakeReq("a", list(range(1, 34)))
    sched.admit(done)
    sched.finish(done)
    waiting = FakeReq("b", list(range(1, 34)) + [99])
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

    key = _key(list(waiting.origin_input_ids))
    first = cache.match_prefix(MatchPrefixParams(key=key, req=waiting))
    again = cache.match_prefix(MatchPrefixParams(key=key, req=waiting))
    assert cache.stats.lookup_memo_hits == 1
    assert first.device_prefix_len == again.device_prefix_len == 32
    assert first.last_device_node is again.last_device_node
    longer = _key(list(waiting.origin_input_ids) + [5] * 8)
    cache.match_prefix(MatchPrefixParams(key=longer, req=waiting))
    cache.match_prefix(MatchPrefixParams(key=key, req=FakeReq("c", list(range(1, 35)))))
    assert cache.stats.lookup_memo_hits == 1
    assert_invariant(cache, sched)


def test_the_pool_reads_the_schedulers_backlog_and_running_batch():
    """Dispatch charges shipping and recompute per running request (``running_requests``);
    the pool's load is the waiting prompts (``queued_tokens``)."""
    from types import SimpleNamespace

    cache, _, _ = make()
    assert cache.running_requests() == 0 and cache.queued_tokens() == 0  # no scheduler yet
    a, b = FakeReq("a", list(range(1, 13))), FakeReq("b", list(range(50, 70)))
    cache._scheduler = SimpleNamespace(waiting_queue=[b], running_batch=SimpleNamespace(reqs=[a, b]))
    assert cache.running_requests() == 2 and cache.queued_tokens() == 20
    cache._scheduler = SimpleNamespace(waiting_queue=None, running_batch=None)
    assert cache.running_requests() == 0 and cache.queued_tokens() == 0


def test_evictions_count_transient_copies_and_the_pools_last_copies():
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    cache, sched, alloc = make(capacity=256, segment_size=8)
    r = FakeReq("a", list(range(1, 41)))  # 5 segments
    sched.admit(r)
    sched.finish(r)
    nodes = cache.tree.match(*cache._key_chain(_key(list(range(1, 41)))))
    assert len(nodes) == 5
    cache.tree.set_designated(nodes[4], False)  # a copy of a segment homed at w2, which holds it
    nodes[4].owners.add("w2")
    nodes[3].owners.add("w3")  # a replica: w3 holds it too
    # the transient copy goes first, then the leaf under it, which w3 still holds
    cache.evict(EvictParams(num_tokens=16))
    s = cache.stats
    assert (s.evicted_segments, s.evicted_transient_segments, s.evicted_last_copies) == (2, 1, 0)
    cache.evict(EvictParams(num_tokens=10**9))  # the rest: the pool's only copies
    assert (s.evicted_segments, s.evicted_transient_segments, s.evicted_last_copies) == (5, 1, 3)
    assert alloc.available_size() == 256
    assert cache.status()["stats"]["evicted_last_copies"] == 3


def test_the_request_log_has_one_line_per_finished_request(tmp_path):
    from sglang_tokenlake.request_log import read

    path = tmp_path / "requests.jsonl"
    cache, sched, _ = make(segment_size=8, request_log=str(path))
    a = FakeReq("a", list(range(1, 30)))
    sched.admit(a)
    sched.finish(a)
    b = FakeReq("b", list(range(1, 20)) + [99] * 10)  # shares 2 full segments with a
    sched.admit(b)
    sched.finish(b, checkpoint=False)
    c = FakeReq("c", list(range(1, 30)))
    sched.admit(c)
    recs = read(str(path))
    assert [(r["rid"], r["worker"], r["prompt_tokens"], r["cached_tokens"],
             r["pulled_tokens"], r["shipped_tokens"]) for r in recs] == [
        ("a", None, 29, 0, 0, 0), ("b", None, 29, 16, 0, 0)]
    assert all(r["t"] > 0 for r in recs)
    assert cache.stats.requests == 2 and cache.stats.hit_tokens == 16
