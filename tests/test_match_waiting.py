"""--tokenlake-match-waiting: SGLang matches every waiting request against the cache at each
scheduling round under its default fcfs policy, as its cache-aware policies do."""

from types import SimpleNamespace

from cache_harness import FakeReq, MiniScheduler, assert_invariant, make_pools
from cache_harness import radix_key as _key

from sglang_tokenlake.config import TokenLakeConfig

DOC = list(range(1, 33))  # 4 segments of 8


class WaitingReq(FakeReq):
    def _compute_max_prefix_len(self, n):
        return n - 1


def _setup(**cfg):
    from sglang_tokenlake.sglang.cache import TokenLakeCache

    params, req_pool, alloc = make_pools(256, 1)
    cache = TokenLakeCache(params, TokenLakeConfig(segment_size=8, **cfg), model_id="m")
    sched = MiniScheduler(cache, req_pool, alloc)
    done = FakeReq("done", DOC + [4])
    sched.admit(done)
    sched.finish(done)
    return cache, sched


def _fcfs_round(cache, monkeypatch, queue):
    """One of SGLang's scheduling rounds ordering the waiting queue (fcfs, no PD)."""
    from sglang.srt.managers import schedule_policy

    monkeypatch.setattr(schedule_policy, "get_disagg",
                        lambda: SimpleNamespace(disaggregation_mode="null"))
    monkeypatch.setattr(schedule_policy, "get_memory",
                        lambda: SimpleNamespace(radix_eviction_policy="lru"))
    policy = schedule_policy.SchedulePolicy("fcfs", cache, False, False, False)
    policy.calc_priority(queue)


def test_every_waiting_request_is_matched_and_its_local_prefix_kept_recent(monkeypatch):
    cache, sched = _setup()
    assert cache.supports_fast_match_prefix()
    queue = [WaitingReq("a", DOC + [7]), WaitingReq("b", list(range(101, 120))),
             WaitingReq("c", DOC[:16] + [9])]
    nodes = cache.tree.match(*cache._key_chain(_key(DOC)), touch=False)
    before = [n.last_access for n in nodes]
    seen = cache.stats.lookups  # the finished request's own
    _fcfs_round(cache, monkeypatch, queue)
    assert cache.stats.lookups - seen == 3  # every waiting request, not only the head
    assert [r.prefix_len for r in queue] == [32, 0, 16]
    assert [r.num_matched_prefix_tokens for r in queue] == [32, 0, 16]
    assert [r.rid for r in queue] == ["a", "b", "c"]  # fcfs keeps the order
    assert all(n.last_access > t for n, t in zip(nodes, before))  # LRU sees the waiting need
    _fcfs_round(cache, monkeypatch, queue)
    assert cache.stats.lookups - seen == 6
    assert cache.stats.lookup_memo_hits == 3  # each chain hashed once
    assert_invariant(cache, sched)


def test_off_only_the_admitted_requests_are_matched(monkeypatch):
    cache, sched = _setup(match_waiting=False)
    assert not cache.supports_fast_match_prefix()
    queue = [WaitingReq("a", DOC + [7]), WaitingReq("b", list(range(101, 120)))]
    seen = cache.stats.lookups
    _fcfs_round(cache, monkeypatch, queue)
    assert cache.stats.lookups == seen
    assert_invariant(cache, sched)
