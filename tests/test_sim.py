"""The simulator: caches, queueing, workloads, and a tiny end-to-end run of every policy."""

import json
from dataclasses import replace

import numpy as np
import pytest
from sim_books import check_books

from sglang_tokenlake.policy import PolicyConfig
from sglang_tokenlake.segments import namespace_seed, segment_keys
from sglang_tokenlake.sim.__main__ import main
from sglang_tokenlake.sim.cache import PrefixLRU, new_cache
from sglang_tokenlake.sim.cluster import Cluster
from sglang_tokenlake.sim.compute import ComputeModel
from sglang_tokenlake.sim.engine import POLICIES, simulate, time_stretch
from sglang_tokenlake.sim.model import SimConfig
from sglang_tokenlake.sim.tokenlake import Horizons, TokenLake
from sglang_tokenlake.sim.workloads import (
    MHA_7B,
    Request,
    Workload,
    generated_shared_prefix,
    longctx,
    loogle_like,
    mooncake_tokens,
    piece_keys,
    scbench_like,
    sharegpt_like,
)


def test_prefix_lru_evicts_leaves_first():
    c = PrefixLRU(4)
    assert c.use([1, 2, 3]) == []
    assert c.use([1, 2, 4]) == []  # 1 and 2 are refreshed after 4: 3 is the oldest leaf
    assert c.keys() == [3, 4, 2, 1]
    assert c.use([5]) == [3]
    assert c.match([1, 2, 4, 3]) == 3 and c.match([2]) == 1 and c.match([9, 1]) == 0
    assert c.overflow(keep=lambda k: k == 4) == [] and len(c) == 4
    c.capacity = 3
    assert c.overflow(keep=lambda k: k == 4) == [2]  # 4 is kept, the next oldest goes


def test_mooncake_hash_ids_become_consistent_token_keys():
    seed = namespace_seed("m")
    a = mooncake_tokens([0, 1, 2], 1400)
    b = mooncake_tokens([0, 1, 7], 1400)
    assert len(a) == 1400 and np.array_equal(a[:1024], b[:1024])
    ka, kb = segment_keys(a, 512, seed), segment_keys(b, 512, seed)
    assert len(ka) == 2 and ka == kb  # full blocks 0 and 1 are shared
    kc = segment_keys(mooncake_tokens([0, 3], 1024), 512, seed)
    assert kc[0] == ka[0] and kc[1] != ka[1]


def test_piece_keys_share_exactly_the_common_full_blocks():
    a = piece_keys([(1, 1000), (50, 30)], 256)
    b = piece_keys([(1, 1000), (51, 30)], 256)
    assert len(a) == 5 and a[:3] == b[:3] and a[3] != b[3]  # 1000 // 256 = 3 shared
    longer = piece_keys([(1, 1000), (50, 300)], 256)
    assert longer[:4] == a[:4]  # the same stream continued: block 3 equal as well
    assert piece_keys([(2, 1000)], 256)[0] != a[0]


def test_queueing_on_one_instance():
    c = ComputeModel()
    cl = Cluster(1, c)
    w1, t1, *_ = cl.run(0, 0.0, new_tokens=1000, local_ctx=0, decode_ctx=1000, output_tokens=10)
    work1 = c.prefill_s(1000, 0) + c.decode_work_s(10, 1000, 1)
    assert w1 == 0.0 and t1 == pytest.approx(c.prefill_s(1000, 0))
    w2, t2, *_ = cl.run(0, 0.0, new_tokens=500, local_ctx=500, decode_ctx=1000, output_tokens=10)
    assert w2 == pytest.approx(work1)  # waits for the GPU work admitted before it
    assert t2 == pytest.approx(work1 + c.prefill_s(500, 500))
    assert cl.instances[0].inflight(0.0) == 2 and cl.instances[0].inflight(1e6) == 0
    cl.charge(0, 0.0, 2.0)
    assert cl.instances[0].remote_s == 2.0


def test_generators_have_the_documented_shapes():
    gsp = generated_shared_prefix(groups=4, prompts_per_group=3)
    assert len(gsp.requests) == 12 and all(r.input_tokens == 2048 + 128 for r in gsp.requests)
    assert len({r.keys[0] for r in gsp.requests}) == 4
    sc = scbench_like(sessions=3, contexts=2, turns=3)
    assert len(sc.requests) == 9
    for w in (loogle_like(requests=50), sharegpt_like(conversations=20), sc, gsp):
        arr = [r.arrival_s for r in w.requests]
        assert arr == sorted(arr)
        assert 0 < w.summary()["infinite_cache_hit_rate"] < 1


def _tiny() -> Workload:
    return generated_shared_prefix(groups=8, prompts_per_group=12, system_prompt_len=1024,
                                   question_len=64, output_len=32)


def test_every_policy_end_to_end():
    w = _tiny()
    uniq = w.unique_full_blocks()
    cfg = SimConfig(4, max(1, uniq // 8), w.segment_size,
                    time_stretch=time_stretch(w, 4, ComputeModel(), 0.7),
                    policy=PolicyConfig(replan_every=8), memory_pressure=False)
    res = {p: simulate(w, p, cfg) for p in POLICIES}
    pressed = {p: simulate(w, p, replace(cfg, memory_pressure=True)) for p in POLICIES}
    for p in POLICIES:  # running requests' KV only ever takes room from the caches
        assert pressed[p].hit_rate < res[p].hit_rate
    bound = w.summary()["infinite_cache_hit_rate"]
    for r in res.values():
        assert r.requests == 96 and 0 <= r.hit_rate <= bound + 1e-9
        assert sum(r.served) == 96 and len(r.busy_s) == 4
    assert res["mooncake"].hit_rate == res["limit"].hit_rate  # the same deduplicated store
    assert res["stock"].hit_rate <= res["limit"].hit_rate
    assert res["tokenlake"].hit_rate >= 0.9 * res["limit"].hit_rate
    assert res["mooncake"].bytes["pull_kv"] == cfg.shape.kv_bytes(res["mooncake"].hit_tokens)
    tl = res["tokenlake"].summary()
    assert sum(tl["segments_by_mode"].values()) == pytest.approx(1.0, abs=1e-3)
    assert set(res["cache_aware"].summary()["router_decisions"]) == {
        "imbalanced", "cache_hit", "least_loaded"}
    assert set(res["cache_aware_v019"].summary()["router_decisions"]) == {
        "imbalanced", "cache_hit", "smallest_tree"}


def _pool(cfg: SimConfig, w: Workload) -> TokenLake:
    tl = TokenLake(cfg, Cluster(cfg.instances, cfg.compute))
    for r in w.requests:
        tl.serve(r, r.arrival_s)
        for cache in tl.caches.values():
            assert len(cache) <= cache.capacity
    return tl


def test_tokenlake_pool_invariants():
    w = loogle_like(requests=300, docs=20, doc_tokens=6000)
    uniq = w.unique_full_blocks()
    pc = PolicyConfig(replan_every=16, hot_window=2000, hot_k=32, replica_budget=0.1)
    cfg = SimConfig(4, max(1, uniq // 10), w.segment_size, policy=pc)
    tl = _pool(cfg, w)
    check_books(tl)
    pol = tl.policy
    assert pol.members == dict.fromkeys(tl.ids, float(cfg.capacity_blocks * w.segment_size))
    assert pol.planner.budget_tokens == int(0.1 * 4 * cfg.capacity_blocks * w.segment_size)
    for key, holders in tl.loc.items():
        if pol.copies.get(key, 1) == 1 and len(holders) == 1:
            assert pol.is_home(key, next(iter(holders)))  # one of its two candidates


@pytest.mark.parametrize("placement", ["segment", "executor"])
def test_hot_segments_get_the_copies_the_policy_plans(placement):
    # Two groups of 3-block prompts: each group's first block is 1/6 of all accesses, so
    # at 4 instances (fair share 1/4, headroom 0.5) it wants ceil(1/6 * 4 / 0.5) = 2 copies.
    w = generated_shared_prefix(groups=2, prompts_per_group=100, system_prompt_len=256,
                                question_len=128, segment_size=128)
    cfg = SimConfig(4, 64, 128, policy=PolicyConfig(replan_every=16, hot_window=512, hot_k=32,
                                                    replica_budget=0.5, placement=placement))
    tl = _pool(cfg, w)
    check_books(tl)
    pol = tl.policy
    firsts = {r.keys[0] for r in w.requests}
    assert len(firsts) == 2 and all(pol.copies.get(k) == 2 for k in firsts)
    assert tl.stats()["replicas_made"] >= 2
    for key, c in pol.copies.items():  # exactly the copies planned, at its homes if placed there
        assert len(tl.loc[key]) == c
        if placement == "segment":
            assert tl.loc[key] == set(pol.placement.homes(key, c))
    cold = SimConfig(4, 64, 128, policy=PolicyConfig(replan_every=16, replica_budget=0.0))
    assert not _pool(cold, w).policy.copies  # no budget, no replicas


def test_new_segments_go_to_the_candidate_with_the_larger_horizon():
    cfg = SimConfig(4, 4, 256, policy=PolicyConfig(placement="segment"))
    tl = TokenLake(cfg, Cluster(4, cfg.compute))
    key = 12345
    first, second = tl.policy.candidates(key)
    for stamp, w in ((1, first), (2, second)):  # fill both: first's LRU data is older
        for k in range(4):
            tl.caches[w].touch(1000 * stamp + k, stamp)
    tl.horizons.clock = 10
    assert tl.horizons[first] == 9 and tl.horizons[second] == 8
    assert tl._update([key], {}, tl.ids[0]) >= 0
    assert tl.loc[key] == {first}
    tl.caches[second].discard(2000)  # free room: an infinite horizon wins
    assert tl.horizons[second] == float("inf")
    tl._update([key + 1, key], {}, tl.ids[0])  # key is cached: only key + 1 is new
    c1 = tl.policy.candidates(key + 1)
    want = max(c1, key=lambda m: tl.horizons[m])
    assert tl.loc[key + 1] == {want}
    one = SimConfig(4, 4, 256, policy=PolicyConfig(placement_choices=1, placement="segment"))
    tl1 = TokenLake(one, Cluster(4, one.compute))
    tl1._update([key], {}, tl1.ids[0])
    assert tl1.loc[key] == {tl1.policy.placement.home(key)}


def test_horizons_are_lru_ages_on_the_logical_clock():
    caches = {"a": PrefixLRU(2), "b": PrefixLRU(2)}
    h = Horizons(caches)
    h.clock = 7
    caches["a"].touch(1, 3)
    caches["a"].touch(2, 5)
    caches["b"].touch(3, 6)
    assert h["a"] == 4 and h["b"] == float("inf") and set(h) == {"a", "b"} and len(h) == 2


def test_a_member_squeezed_to_no_room_is_never_a_placement_choice():
    # Running requests hold all of `first`'s memory: its empty cache has no room, so a
    # new segment goes to `second`, whose cache is full of old data. (Before, an empty
    # cache of capacity 0 read as free room and won every choice, only to evict at once.)
    cfg = SimConfig(4, 4, 256, policy=PolicyConfig(placement="segment"))
    tl = TokenLake(cfg, Cluster(4, cfg.compute))
    key = 12345
    first, second = tl.policy.candidates(key)
    for k in range(4):
        tl.caches[second].touch(2000 + k, 1)
    tl.pressure({tl.index[first]: 4 * 256}, 0.0)
    assert tl.caches[first].capacity == 0 and tl.horizons[first] == float("-inf")
    tl.horizons.clock = 10
    tl._update([key], {}, tl.ids[0])
    assert tl.loc[key] == {second}
    for cache in (PrefixLRU(0), new_cache(0, PolicyConfig(eviction="aware"))):
        assert cache.oldest_stamp() == float("inf")


@pytest.mark.parametrize("placement", ["chain", "executor"])
def test_a_requests_new_segments_are_placed_together(placement):
    cfg = SimConfig(4, 16, 256, policy=PolicyConfig(placement=placement, replica_budget=0))
    tl = TokenLake(cfg, Cluster(4, cfg.compute))
    ex = tl.ids[2]
    keys = [101, 102, 103, 104, 105]
    tl._update(keys[:2], {}, tl.ids[0])  # the first two are cached already
    before = {k: set(tl.loc[k]) for k in keys[:2]}
    home = ex if placement == "executor" else tl.policy.place(keys[-1], tl.horizons)[0]
    put = tl._update(keys, {}, ex)
    assert {k: tl.loc[k] for k in keys[2:]} == dict.fromkeys(keys[2:], {home})
    assert {k: tl.loc[k] for k in keys[:2]} == before
    assert put == (0 if home == ex else 3 * cfg.shape.kv_bytes(256))
    check_books(tl)


def test_pool_wide_leaf_first_keeps_a_parent_whose_child_is_elsewhere():
    cfg = SimConfig(2, 2, 256, policy=PolicyConfig(placement_choices=1, replica_budget=0,
                                                   placement="segment"))
    tl = TokenLake(cfg, Cluster(2, cfg.compute))
    home = tl.policy.placement.home
    a, b = tl.ids
    # A parent on `a` whose child lives on `b`, then two fresh segments for `a`.
    parent = next(k for k in range(1, 10**6) if home(k) == a)
    child = next(k for k in range(1, 10**6) if home(k) == b)
    tl._update([parent, child], {}, a)
    fresh = [k for k in range(10**6, 2 * 10**6) if home(k) == a][:2]
    tl._update([fresh[0]], {}, a)
    tl._update([fresh[1]], {}, a)
    assert parent in tl.loc and fresh[0] not in tl.loc  # the older fresh one went instead
    check_books(tl)
    off = SimConfig(2, 2, 256, policy=PolicyConfig(placement_choices=1, replica_budget=0,
                                                   pool_leaf_first=False, placement="segment"))
    tl2 = TokenLake(off, Cluster(2, off.compute))
    tl2._update([parent, child], {}, a)
    tl2._update([fresh[0]], {}, a)
    tl2._update([fresh[1]], {}, a)
    assert parent not in tl2.loc  # plain LRU drops the stranded parent


def _two_requests(out_a: int) -> Workload:
    # B comes 0.1 s after A, while A runs (its prefill alone takes 0.05 s).
    keys = piece_keys([(1, 500)], 100)
    return Workload("t", 100, [Request(0.0, 500, out_a, keys), Request(0.1, 500, 1, keys),
                               Request(1e6, 500, 1, keys)])


@pytest.mark.parametrize("policy", ["stock", "cache_aware", "tokenlake", "limit", "mooncake"])
def test_running_requests_kv_shrinks_the_cache(policy):
    # One instance, 100-token blocks. A (500 prompt + 1000 output tokens = 15 blocks) runs
    # for > 10 s: while it runs an 11-block cache has no room, so B (same prompt, 0.1 s later)
    # misses and C (after A ended) finds the room back but the blocks gone. Without memory
    # pressure B and C hit all 5 blocks.
    w = _two_requests(1000)
    assert simulate(w, policy, SimConfig(1, 11, 100)).hit_tokens == 0
    assert simulate(w, policy, SimConfig(1, 11, 100, memory_pressure=False)).hit_tokens == 1000
    # A short answer (500 + 10 tokens = 6 blocks) leaves 11 - 6 = 5 blocks: B and C hit.
    assert simulate(_two_requests(10), policy, SimConfig(1, 11, 100)).hit_tokens == 1000
    # With 10 blocks, 4 remain: the deepest block goes, B and C hit the other 4.
    assert simulate(_two_requests(10), policy, SimConfig(1, 10, 100)).hit_tokens == 800
    # Counting only KV held outside the cache: A holds just its answer (the prompt is the
    # cache's), so 10 - 1 = 9 blocks remain; 1000 output tokens still take all 10.
    shared = SimConfig(1, 10, 100, shared_prefix_kv=True)
    assert simulate(_two_requests(10), policy, shared).hit_tokens == 1000
    assert simulate(w, policy, shared).hit_tokens == 0


def test_pooled_caches_lose_the_sum_over_instances():
    # Two instances of 5 blocks each: a 10-block pool, all of it taken by A's 15 blocks
    # while it runs, wherever it runs; without pressure B and C hit.
    w = _two_requests(1000)
    assert simulate(w, "limit", SimConfig(2, 5, 100)).hit_tokens == 0
    assert simulate(w, "limit", SimConfig(2, 5, 100, memory_pressure=False)).hit_tokens == 1000
    assert simulate(w, "limit", SimConfig(2, 10, 100)).hit_tokens == 1000  # 20 - 15 = 5
    # 16 - 15 = 1 block of room: B hits the most recently used (shallowest) block, it
    # stays, and C finds it.
    assert simulate(w, "limit", SimConfig(2, 8, 100)).hit_tokens == 100 + 100


def test_a_prefix_serves_others_only_once_its_prefill_has_finished():
    # 5-second prefills (500 tokens at 10 ms): B arrives 0.1 s after A with the same
    # prompt. In the pool B starts at once on the idle second instance, while A still
    # computes the prefix: B computes it again (SGLang inserts a prefix after its
    # prefill). C, much later, hits. Without the rule B hits at arrival.
    slow = ComputeModel(prefill_s_per_token=0.01, attn_s_per_token_pair=0.0)
    w = _two_requests(1)
    seen = SimConfig(2, 50, 100, compute=slow, memory_pressure=False, prefill_visibility=True)
    r = simulate(w, "limit", seen)
    assert r.hit_tokens == 500 and r.extra["hits_cut_by_running_prefill"] == 1
    assert simulate(w, "limit", replace(seen, prefill_visibility=False)).hit_tokens == 1000
    assert simulate(w, "tokenlake", seen).hit_tokens == 500
    # One instance of its own cache: B queues behind A and starts after A's prefill: a hit.
    one = replace(seen, instances=1)
    r = simulate(w, "stock", one)
    assert r.hit_tokens == 1000 and r.extra["hits_cut_by_running_prefill"] == 0


def test_a_hit_cut_by_a_running_prefill_holds_its_own_copy():
    from sglang_tokenlake.sim.engine import _shorten
    from sglang_tokenlake.sim.model import Outcome

    out = Outcome(0, 400, {1: 200}, {"pull_kv": 1000, "put": 7}, 2.0, 30)
    cut = _shorten(out, 1, 4, 100)
    assert cut.hit_tokens == 100 and cut.held_tokens == 30 + 300
    assert cut.shipped == {} and cut.bytes == {"pull_kv": 250, "put": 7}
    assert cut.transfer_s == 0.5 and cut.worker == 0


def test_cluster_reports_kv_holds_from_start_to_last_token():
    c = ComputeModel()
    cl = Cluster(2, c)
    assert cl.kv_changes(0.0) == {}
    cl.run(1, 0.0, new_tokens=100, local_ctx=0, decode_ctx=100, output_tokens=10, kv_tokens=300)
    assert cl.kv_changes(0.0) == {1: 300} and cl.running_kv == [0, 300]
    end = c.prefill_s(100, 0) + 10 * c.tpot_s(100, 1)
    assert cl.kv_changes(end * 0.99) == {}
    assert cl.kv_changes(end) == {1: 0}
    # A queued request holds nothing until it starts.
    cl.run(0, 0.0, new_tokens=10_000, local_ctx=0, decode_ctx=10_000, output_tokens=1)
    start = cl.instances[0].free_at
    cl.run(0, 0.0, new_tokens=10, local_ctx=0, decode_ctx=10, output_tokens=1, kv_tokens=50)
    assert start > 1.0
    assert cl.kv_changes(start * 0.99) == {} and cl.kv_changes(start) == {0: 50}


def test_tokenlake_shipped_segments_hold_no_executor_memory():
    # longctx: queries are shipped to the context's owner, so an executor's hold is
    # the question and the answer, not the context (segment placement spreads each
    # context over both instances, so every request has an owner to ship to).
    w = longctx(requests=40, contexts=2, seed=1)
    cfg = SimConfig(2, 2 * w.unique_full_blocks(), w.segment_size, shape=MHA_7B,
                    policy=PolicyConfig(placement="segment"))
    tl = TokenLake(cfg, Cluster(2, cfg.compute))
    outs = [tl.serve(r, r.arrival_s) for r in w.requests]
    shipped = [(o, r) for o, r in zip(outs, w.requests) if o.shipped]
    assert shipped
    for o, r in shipped:
        assert "pull_kv" not in o.bytes  # cached segments are local or shipped
        assert o.held_tokens <= r.input_tokens - o.hit_tokens < 2 * w.segment_size


def test_cli_writes_json_and_markdown(tmp_path, monkeypatch):
    w = _tiny()
    monkeypatch.setattr("sglang_tokenlake.sim.__main__.load", lambda *a, **k: w)
    rc = main(["--workload", "gsp", "--instances", "2", "4", "--capacity", "0.2",
               "--jobs", "1", "--out", str(tmp_path), "--tag", "t", "--no-plots"])
    assert rc == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert len(doc["runs"]) == 2 * len(POLICIES)
    assert doc["config"]["memory_pressure"] is True and doc["config"]["segment_size"] == 128
    assert "| 4 | 20% |" in (tmp_path / "t.md").read_text()


def test_request_is_plain_data():
    r = Request(1.0, 1000, 10, (1, 2))
    assert Workload("x", 512, [r]).full_blocks(r) == 1


def test_longctx_has_few_long_zipf_contexts_and_an_mha_model():
    w = longctx(seed=2)
    assert w.shape == MHA_7B and MHA_7B.kv_bytes(1) == 4 * 131072
    firsts = {}
    for r in w.requests:
        firsts[r.keys[0]] = firsts.get(r.keys[0], 0) + 1
        assert 16384 + 20 <= r.input_tokens < 32768 + 200 and 8 <= r.output_tokens <= 512
    counts = sorted(firsts.values(), reverse=True)
    assert len(counts) == 8 and counts[0] > 2.5 * counts[-1]  # Zipf(1): 1/1 vs 1/8
    assert 8 * 16384 // 256 <= w.unique_full_blocks() <= 8 * 32768 // 256 + len(w.requests)


def test_a_pressed_executor_ships_what_it_would_pull_with_room():
    """The simulator charges a pull its evictions as the live pool does
    (``dispatch.pull_pressure``) where its memory model gives a pulled copy room of its
    own (``shared_prefix_kv``): with free room the executor pulls B's two segments, with
    its memory held by running requests it ships its queries to B instead."""
    seg = 256
    req = Request(0.0, input_tokens=2 * seg + 1, output_tokens=9, keys=(1, 2, 3))

    def served(squeezed: bool, remote_mode: str = "auto", shared_prefix_kv: bool = True):
        cfg = SimConfig(2, 8, seg, policy=PolicyConfig(replica_budget=0, remote_mode=remote_mode),
                        tokenlake_executor="round_robin", shared_prefix_kv=shared_prefix_kv)
        tl = TokenLake(cfg, Cluster(2, cfg.compute))
        a_id, b_id = tl.ids
        tl._update([1, 2], {}, b_id)
        assert tl.loc[1] == tl.loc[2] == {b_id}
        if squeezed:
            tl.pressure({0: 8 * seg}, 0.0)  # A's running requests hold all its KV
        out = tl.serve(req, 0.0)
        assert out.worker == 0 and out.hit_tokens == 2 * seg
        check_books(tl)
        return out

    roomy = served(False)
    assert roomy.shipped == {} and roomy.bytes["pull_kv"] == 2 * SimConfig(2, 8, seg).shape.kv_bytes(seg)
    pressed = served(True)
    assert pressed.shipped == {1: 2 * seg} and "pull_kv" not in pressed.bytes
    # Pinned to pulling (live --tokenlake-remote-mode pull, sim --remote-mode pull) it pulls.
    pinned = served(True, remote_mode="pull")
    assert pinned.shipped == {} and pinned.bytes["pull_kv"] == roomy.bytes["pull_kv"]
    # Where a request holds its whole prompt anyway (the default model) shipping saves no
    # room, and nothing is charged.
    whole = served(True, shared_prefix_kv=False)
    assert whole.shipped == {} and whole.bytes["pull_kv"] == roomy.bytes["pull_kv"]


def test_the_pool_counts_the_segments_it_evicts_and_its_last_copies():
    from sglang_tokenlake.sim.workloads import piece_keys

    a, b = piece_keys([(1, 400)], 100), piece_keys([(2, 400)], 100)
    wl = Workload("t", 100, [Request(0.0, 400, 1, a), Request(1e3, 400, 1, b),
                             Request(2e3, 400, 1, a)])
    # One instance of 4 blocks: B evicts A's 4 blocks, A back evicts B's: all last copies.
    one = simulate(wl, "tokenlake", SimConfig(1, 4, 100, memory_pressure=False))
    assert (one.extra["evicted_segments"], one.extra["evicted_last_copies"]) == (8, 8)
    assert one.hits == [0, 0, 0]
    # Two: each context fits where it was placed; nothing leaves, A hits.
    two = simulate(wl, "tokenlake", SimConfig(2, 4, 100, memory_pressure=False))
    assert (two.extra["evicted_segments"], two.extra["evicted_last_copies"]) == (0, 0)
    assert two.hits == [0, 0, 400]
