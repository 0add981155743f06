"""Spilling in the simulator: ``PrefixLRU.place`` and ``TokenLake``'s hand-over of the
pool's last copies (``PolicyConfig.spill_margin``), as the live ``pool.spill.Spill``."""

import pytest
from sim_books import check_books

from sglang_tokenlake.eviction import AwareCache
from sglang_tokenlake.policy import SPILL_SHARE, PolicyConfig
from sglang_tokenlake.sim.cache import PrefixLRU
from sglang_tokenlake.sim.cluster import Cluster
from sglang_tokenlake.sim.engine import simulate
from sglang_tokenlake.sim.model import SimConfig
from sglang_tokenlake.sim.tokenlake import TokenLake
from sglang_tokenlake.sim.workloads import longctx

S = 256


def test_a_placed_key_takes_its_place_among_older_entries():
    c = PrefixLRU(6)
    for k, st in ((1, 1.0), (2, 2.0), (3, 3.0)):
        c.touch(k, st)
    c.place(10, 1.5)
    c.place(11, 2.0)  # a tie: the placed key counts as the older one
    c.place(12, 9.0)  # newer than everything: appended
    assert c.keys() == [1, 10, 11, 2, 3, 12] and len(c) == 6
    assert 10 in c and c.match([10, 11, 4]) == 2 and c.oldest_stamp() == 1.0
    with pytest.raises(ValueError, match="cached already"):
        c.place(2, 0.5)
    c.touch(10, 10.0)  # used again: now the newest
    assert c.keys() == [1, 11, 2, 3, 12, 10]
    c.capacity = 3
    stamps: list[float] = []
    assert c.overflow(keep=lambda k: k == 1, dropped=lambda k, s: stamps.append(s)) == [11, 2, 3]
    assert stamps == [2.0, 2.0, 3.0] and c.keys() == [1, 12, 10]
    c.discard(1)
    c.capacity = 1
    assert c.overflow(dropped=lambda k, s: stamps.append(s)) == [12] and stamps[-1] == 9.0
    assert c.keys() == [10] and c.oldest_stamp() == 10.0


def test_the_aware_cache_places_an_aged_key_too():
    c = AwareCache(2)
    c.touch(1, 5.0)
    c.place(2, 1.0)
    with pytest.raises(ValueError, match="cached already"):
        c.place(1, 0.0)
    c.capacity = 1
    stamps: list[float] = []
    assert c.overflow(dropped=lambda k, s: stamps.append(s)) == [2] and stamps == [1.0]


def _pool(margin: float, window: float = 0.5) -> TokenLake:
    cfg = SimConfig(3, 8, S, policy=PolicyConfig(replica_budget=0, spill_margin=margin),
                    spill_window_s=window)
    return TokenLake(cfg, Cluster(3, cfg.compute))


def _fill(tl: TokenLake):
    a_id, b_id, c_id = tl.ids
    a = list(range(100, 106))  # 6 segments on A
    b = list(range(200, 208))  # B full
    c = list(range(300, 302))  # C has free room
    tl._update(a, {}, a_id)  # clock 1
    tl._update(b, {}, b_id)  # clock 2
    tl._update(c, {}, c_id)  # clock 3
    tl.horizons.clock = 20
    return a, a_id, b_id, c_id


def test_a_squeezed_member_spills_its_last_copies_to_the_oldest_data_within_its_share():
    tl = _pool(margin=2.0)
    a, a_id, b_id, c_id = _fill(tl)
    tl.pressure({0: 4 * S}, 0.0)  # A keeps 4 of its 6 segments
    # A's two deepest (age 19) go to C (free room: an infinite horizon), at their age.
    assert tl.loc[a[5]] == {c_id} and tl.loc[a[4]] == {c_id}
    assert tl.caches[c_id].keys() == [a[5], a[4], 301, 300]
    assert tl._spill_bytes == 2 * tl.cfg.shape.kv_bytes(S) and tl._spilled == 2
    check_books(tl)
    # C has had SPILL_SHARE of its capacity this window; B's data (horizon 18) is not
    # more than twice as old as A's (age 19): the next two are lost.
    assert SPILL_SHARE * 8 == 2
    tl.pressure({0: 6 * S}, 0.1)
    assert a[3] not in tl.loc and a[2] not in tl.loc and tl._spilled == 2
    check_books(tl)
    tl.pressure({0: 7 * S}, 0.6)  # a new window: C receives again
    assert tl.loc[a[1]] == {c_id} and tl._spilled == 3
    assert [k for k in a if k in tl.loc] == [a[0], a[1], a[4], a[5]]
    check_books(tl)
    assert tl.stats()["spilled_segments"] == 3


def test_without_a_margin_the_last_copies_leave_the_pool():
    tl = _pool(margin=0.0)
    a, a_id, b_id, c_id = _fill(tl)
    tl.pressure({0: 4 * S}, 0.0)
    assert [k for k in a if k in tl.loc] == a[:4]
    assert tl._spill_bytes == 0 and "spilled_segments" not in tl.stats()
    check_books(tl)


def test_a_receiver_evicts_its_own_older_data_and_does_not_spill_it_back():
    tl = _pool(margin=1.0)
    a_id, b_id, c_id = tl.ids
    c = list(range(300, 308))
    tl._update(c, {}, c_id)  # clock 1: C full with the oldest data
    a = list(range(100, 106))
    tl._update(a, {}, a_id)  # clock 2
    tl._update(list(range(200, 208)), {}, b_id)  # clock 3
    tl.horizons.clock = 20
    tl.pressure({0: 4 * S}, 0.0)  # A's deepest two (age 18) go to C (horizon 19)
    assert tl.loc[a[5]] == {c_id} and tl.loc[a[4]] == {c_id}
    # C made room by evicting its two oldest; nobody's data was older than theirs.
    assert c[7] not in tl.loc and c[6] not in tl.loc
    assert tl.caches[c_id].keys() == c[5::-1] + [a[5], a[4]] and tl._spilled == 2
    check_books(tl)


def test_spilling_in_a_whole_run_reports_what_it_moved():
    wl = longctx(requests=120, contexts=6, seed=1)
    base = dict(instances=4, capacity_blocks=wl.unique_full_blocks() // 8,
                segment_size=wl.segment_size, shape=wl.shape, shared_prefix_kv=True)
    off = simulate(wl, "tokenlake", SimConfig(**base))
    on = simulate(wl, "tokenlake", SimConfig(**base, policy=PolicyConfig(spill_margin=2.0)))
    n = on.extra["spilled_segments"]
    assert n > 0 and on.bytes["spill"] == n * wl.shape.kv_bytes(wl.segment_size)
    assert "spill" not in off.bytes and "spilled_segments" not in off.extra
    assert on.hit_tokens != off.hit_tokens


def test_a_leaf_evicted_in_the_same_call_no_longer_protects_its_parent():
    # Pool-wide leaf-first sees each eviction as it happens: after X's leaf goes, X's
    # next segment has no cached child and is the oldest, so it goes next. (Before, the
    # location index was updated after the whole call: the parent looked protected and
    # the newer chain Y lost its leaf instead.)
    tl = _pool(margin=0.0)
    a_id = tl.ids[0]
    x, y = [10, 11, 12, 13], [20, 21, 22, 23]
    tl._update(x, {}, a_id)  # clock 1
    tl._update(y, {}, a_id)  # clock 2
    tl.pressure({0: 2 * S}, 0.0)  # room for 6
    assert [k for k in x + y if k in tl.loc] == [10, 11, 20, 21, 22, 23]
    check_books(tl)


def test_a_member_whose_share_is_under_one_segment_receives_nothing():
    # As live (``Spill._room``): a quarter of a 3-segment cache is less than a segment.
    cfg = SimConfig(2, 3, S, policy=PolicyConfig(replica_budget=0, spill_margin=1.0))
    tl = TokenLake(cfg, Cluster(2, cfg.compute))
    tl._update([1, 2, 3], {}, tl.ids[0])
    tl.horizons.clock = 10
    tl.pressure({0: 2 * S}, 0.0)  # the other member is empty: free room, yet too small a share
    assert [k for k in (1, 2, 3) if k in tl.loc] == [1] and tl._spilled == 0
    check_books(tl)


@pytest.mark.parametrize("hops", [0, 1])
def test_a_segment_handed_over_spill_hops_times_is_dropped_at_its_next_eviction(hops):
    cfg = SimConfig(3, 8, S, policy=PolicyConfig(replica_budget=0, spill_margin=1.0,
                                                 spill_hops=hops))
    tl = TokenLake(cfg, Cluster(3, cfg.compute))
    a_id, b_id, c_id = tl.ids
    b = list(range(200, 208))
    tl._update(b, {}, b_id)  # clock 1: B full with the oldest data
    a = list(range(100, 106))
    tl._update(a, {}, a_id)  # clock 2
    tl._update([300, 301], {}, c_id)  # clock 3: C has room
    tl.horizons.clock = 20
    tl.pressure({0: 4 * S}, 0.0)  # A's deepest two (age 18) go to C (free room)
    assert tl.loc[a[5]] == {c_id} and tl.loc[a[4]] == {c_id} and tl._spilled == 2
    check_books(tl)
    # C squeezed in a new window: they are its oldest; B's data (horizon 19) is older.
    tl.pressure({2: 6 * S}, 0.6)
    if hops == 0:  # no limit: on to B; then a[4], the last copy of a[5]'s parent, stays
        # (pool-wide leaf-first) and C's next oldest leaf (age 17) goes to B too
        assert tl.loc[a[5]] == {b_id} and tl.loc[a[4]] == {c_id} and tl.loc[301] == {b_id}
        assert tl._spilled == 4
    else:  # handed over once already: dropped, and then its parent
        assert a[5] not in tl.loc and a[4] not in tl.loc and tl._spilled == 2
        assert tl._hops == {}
    check_books(tl)


def test_members_evict_in_a_fixed_order_whatever_the_hash_seed():
    # Who evicts first decides where spilled segments go (the first receiver's room is
    # taken), so the order must not be a set's, which changes with PYTHONHASHSEED.
    cfg = SimConfig(4, 8, S, policy=PolicyConfig(replica_budget=0, spill_margin=1.0))
    tl = TokenLake(cfg, Cluster(4, cfg.compute))
    w0, w1, w2, w3 = tl.ids
    for w in (w3, w0, w2):  # one segment cached at three members
        tl.caches[w].touch(7, 1.0, None, 0)
    tl.loc[7] = {w3, w0, w2}
    order: list[str] = []
    tl._evict = order.append
    tl._update([7], {}, w1)  # recomputed at w1: the three copies are refreshed
    assert order == [w0, w2, w3]
    received = {w3: {w2, w0}, w2: set(), w0: set()}
    seen: list[str] = []
    tl._evict_one = lambda w: seen.append(w) or received.get(w, set())
    TokenLake._evict(tl, w3)  # w3 spilled to w2 and w0: they evict in the pool's order
    assert seen == [w3, w2, w0]
