"""The simulator: caches, queueing, workloads, and a tiny end-to-end run of every policy."""

import json

import numpy as np
import pytest

from sglang_tokenlake.segments import namespace_seed, segment_keys
from sglang_tokenlake.sim.__main__ import main
from sglang_tokenlake.sim.cache import PrefixLRU
from sglang_tokenlake.sim.cluster import Cluster
from sglang_tokenlake.sim.compute import ComputeModel
from sglang_tokenlake.sim.engine import SimConfig, simulate, time_stretch
from sglang_tokenlake.sim.workloads import (
    Request,
    Workload,
    generated_shared_prefix,
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
    w1, t1 = cl.run(0, 0.0, new_tokens=1000, local_ctx=0, decode_ctx=1000, output_tokens=10)
    work1 = c.prefill_s(1000, 0) + c.decode_work_s(10, 1000, 1)
    assert w1 == 0.0 and t1 == pytest.approx(c.prefill_s(1000, 0))
    w2, t2 = cl.run(0, 0.0, new_tokens=500, local_ctx=500, decode_ctx=1000, output_tokens=10)
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
    cfg = SimConfig(4, max(1, uniq // 8), w.segment_tokens,
                    time_stretch=time_stretch(w, 4, ComputeModel(), 0.7), replan_every=8)
    res = {p: simulate(w, p, cfg) for p in ("stock", "cache_aware", "mooncake", "tokenlake", "limit")}
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
        "imbalanced", "cache_hit", "smallest_tree"}


def test_tokenlake_pool_invariants():
    from sglang_tokenlake.sim.tokenlake import TokenLake

    w = loogle_like(requests=300, docs=20, doc_tokens=6000)
    uniq = w.unique_full_blocks()
    cfg = SimConfig(4, max(1, uniq // 10), w.segment_tokens, replan_every=16, hh_window=2000,
                    hh_k=32, replica_budget=0.1)
    cluster = Cluster(4, cfg.compute)
    tl = TokenLake(cfg, cluster)
    for r in w.requests:
        tl.serve(r, r.arrival_s)
        for cache in tl.caches.values():
            assert len(cache) <= cfg.capacity_blocks
    held = {}
    for wid, cache in tl.caches.items():
        for k in cache.keys():
            held.setdefault(k, set()).add(wid)
    assert held == tl.loc  # the location index is exactly what the caches hold
    for key, holders in tl.loc.items():
        if tl.copies.get(key, 1) == 1 and len(holders) == 1:
            assert next(iter(holders)) in tl.placement.homes(key, cfg.placement_choices)


def test_cli_writes_json_and_markdown(tmp_path, monkeypatch):
    w = _tiny()
    monkeypatch.setattr("sglang_tokenlake.sim.__main__.load", lambda *a, **k: w)
    rc = main(["--workload", "gsp", "--instances", "2", "4", "--capacity", "0.2",
               "--jobs", "1", "--out", str(tmp_path), "--tag", "t", "--no-plots"])
    assert rc == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert len(doc["runs"]) == 2 * 5
    assert "| 4 | 20% |" in (tmp_path / "t.md").read_text()


def test_request_is_plain_data():
    r = Request(1.0, 1000, 10, (1, 2))
    assert Workload("x", 512, [r]).full_blocks(r) == 1
