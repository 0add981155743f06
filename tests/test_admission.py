"""--tokenlake-admission resident-first: the order rule, and the scheduler hook on a real cache."""

import math
from types import SimpleNamespace

import pytest
from cache_harness import FakeReq, MiniScheduler, assert_invariant, make_pools

from sglang_tokenlake.admission import resident_first
from sglang_tokenlake.config import TokenLakeConfig


def test_most_resident_first_then_arrival_among_equals():
    entered = [1.0, 2.0, 3.0, 4.0, 5.0]
    resident = [0, 64, 0, 128, 64]
    assert resident_first(entered, resident, now=6.0, max_wait=10.0) == [3, 1, 4, 0, 2]


def test_overdue_requests_go_first_by_arrival_whatever_their_prefix():
    entered = [5.0, 1.0, 3.0, 9.0]
    resident = [0, 0, 256, 512]
    # At 10 s with max_wait 6, requests 1 (waited 9 s) and 2 (7 s) are overdue.
    assert resident_first(entered, resident, now=10.0, max_wait=6.0) == [1, 2, 3, 0]
    # Exactly max_wait counts (request 0 at 11 s); overdue ones go by arrival.
    assert resident_first(entered, resident, now=11.0, max_wait=6.0) == [1, 2, 0, 3]


def test_equal_requests_keep_queue_order():
    assert resident_first([1.0] * 4, [7] * 4, now=2.0, max_wait=5.0) == [0, 1, 2, 3]
    assert resident_first([], [], now=0.0, max_wait=1.0) == []


@pytest.mark.parametrize("max_wait", [0.0, -1.0, math.nan])
def test_a_non_positive_max_wait_is_refused(max_wait):
    with pytest.raises(ValueError, match="max_wait must be positive"):
        resident_first([0.0], [0], now=1.0, max_wait=max_wait)


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="2 arrival times for 1 requests"):
        resident_first([0.0, 1.0], [0], now=1.0, max_wait=1.0)


@pytest.mark.parametrize("kw, message", [
    ({"admission": "lpm"}, "--tokenlake-admission must be one of fcfs, resident-first"),
    ({"admission_max_wait": 0.0}, "--tokenlake-admission-max-wait must be positive"),
    ({"admission_max_wait": math.nan}, "--tokenlake-admission-max-wait must be positive"),
])
def test_config_refuses_bad_admission_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        TokenLakeConfig(**kw)


# -- the hook, on a real TokenLakeCache and SGLang's own SchedulePolicy --------------

DOC_A = list(range(1, 33))  # 4 segments of 8
DOC_B = list(range(101, 133))


def _cache(**cfg):
    from sglang_tokenlake.sglang.cache import TokenLakeCache

    params, req_pool, alloc = make_pools(256, 1)
    cache = TokenLakeCache(params, TokenLakeConfig(segment_size=8, **cfg), model_id="m")
    return cache, MiniScheduler(cache, req_pool, alloc)


def _waiting(rid, tokens, entered):
    r = FakeReq(rid, tokens)
    r.time_stats = SimpleNamespace(wait_queue_entry_time=entered)
    return r


def _queue():
    return [
        _waiting("b", DOC_B + [7, 7], 100.0),      # nothing resident
        _waiting("a-half", DOC_A[:16] + [9], 101.0),  # 16 resident
        _waiting("a", DOC_A + [5, 5, 5], 102.0),    # 32 resident
        _waiting("short", [1, 2, 3], 103.0),        # shorter than a segment
    ]


def test_resident_tokens_counts_the_local_prefix_and_touches_nothing():
    from array import array

    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache, sched = _cache(admission="resident-first")
    done = FakeReq("done", DOC_A + [4])
    sched.admit(done)
    sched.finish(done)
    nodes = list(cache.tree.iter_nodes())
    before = [(n.last_access, n.hits) for n in nodes]
    lookups, evictable = cache.stats.lookups, cache.evictable_size()
    r = FakeReq("r", DOC_A + [5])
    assert cache.resident_tokens(r, RadixKey(array("q", DOC_A + [5]))) == 32
    assert cache.resident_tokens(r, RadixKey(array("q", DOC_A[:20]))) == 16
    assert cache.resident_tokens(r, RadixKey(array("q", DOC_B))) == 0
    assert cache.resident_tokens(r, RadixKey(array("q", [1, 2]))) == 0
    assert [(n.last_access, n.hits) for n in nodes] == before
    assert cache.stats.lookups == lookups and cache.evictable_size() == evictable
    assert_invariant(cache, sched)


def test_the_hook_reorders_sglangs_fcfs_queue_by_resident_tokens():
    from sglang.srt.managers.schedule_policy import SchedulePolicy

    from sglang_tokenlake.sglang.admission import after_calc_priority, reorder

    cache, sched = _cache(admission="resident-first", admission_max_wait=4.0)
    done = FakeReq("done", DOC_A + [4])
    sched.admit(done)
    sched.finish(done)
    policy = SchedulePolicy("fcfs", cache, False, False, False)  # the hook's ``self``
    queue = _queue()  # in SGLang's fcfs order (calc_priority leaves it so)
    after_calc_priority(None, policy, queue)  # the hook's clock is far past 4 s: all overdue
    assert [r.rid for r in queue] == ["b", "a-half", "a", "short"]
    reorder(cache, queue, now=103.5)  # nobody overdue
    assert [r.rid for r in queue] == ["a", "a-half", "b", "short"]
    reorder(cache, queue, now=104.5)  # b has waited 4.5 s: it goes first
    assert [r.rid for r in queue] == ["b", "a", "a-half", "short"]
    assert_invariant(cache, sched)


def test_fcfs_admission_leaves_the_queue_alone():
    from sglang_tokenlake.sglang.admission import after_calc_priority

    cache, sched = _cache()  # the default: fcfs
    done = FakeReq("done", DOC_A + [4])
    sched.admit(done)
    sched.finish(done)
    queue = _queue()
    for r in queue:
        r.time_stats.wait_queue_entry_time = 1e12  # would be anything but overdue
    after_calc_priority(None, SimpleNamespace(tree_cache=cache), queue)
    assert [r.rid for r in queue] == ["b", "a-half", "a", "short"]
    after_calc_priority(None, SimpleNamespace(tree_cache=object()), queue)  # not TokenLake
    assert [r.rid for r in queue] == ["b", "a-half", "a", "short"]


def test_the_hook_target_exists_in_sglang():
    import inspect

    from sglang.srt.managers.schedule_policy import SchedulePolicy

    params = list(inspect.signature(SchedulePolicy.calc_priority).parameters)
    assert params[:2] == ["self", "waiting_queue"]
