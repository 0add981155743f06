"""Live against simulated: the harness's exact requests replayed in the simulator."""

from __future__ import annotations

import json

import pytest

from sglang_tokenlake.bench.workloads import build
from sglang_tokenlake.sim.live import compare, main, replay_requests

PARAMS = {"requests": 30, "documents": 3, "doc_tokens": 256, "question_tokens": 16,
          "output_tokens": 4, "seed": 3, "rate": 2.0, "unique_doc_tokens": 768}


def _bench(tmp_path, configs):
    meta = {"settings": {"workers": 2, "segment_size": 64, "max_total_tokens": 4096},
            "workloads": [{"name": "docs", "params": PARAMS}]}
    summaries = [{"workload": "docs", "rate": 2.0, "config": c, "hit_rate": 0.5,
                  "load_cv_requests": 0.1} for c in configs]
    calib = [{"samples": [{"prompt_tokens": 272, "output_tokens": 4, "ttft_miss_s": 0.1,
                           "e2e_miss_s": 0.13}]}]
    (tmp_path / "bench.json").write_text(json.dumps(
        {"meta": meta, "summaries": summaries, "calibration": calib}))
    return tmp_path


def test_the_replayed_requests_are_the_harness_requests():
    wl, cpt, _ = replay_requests({"name": "docs", "params": PARAMS}, {}, 64)
    want = build("docs", {k: v for k, v in PARAMS.items()
                          if k not in ("seed", "rate", "unique_doc_tokens")}, seed=3).at_rate(2.0)
    assert len(wl.requests) == len(want.requests) == 30
    for r, w in zip(wl.requests, want.requests):
        assert r.input_tokens == len(w.input_ids) and r.output_tokens == w.max_new_tokens
        assert r.arrival_s == w.arrival_s
        assert len(r.keys) == -(-len(w.input_ids) // 64)  # full segments + the tail
    # requests on the same document share its segments' keys, others do not
    by_doc: dict = {}
    for r, w in zip(wl.requests, want.requests):
        by_doc.setdefault(w.group, set()).add(r.keys[0])  # every document has >= 2 segments
    assert all(len(v) == 1 for v in by_doc.values()) and len(by_doc) >= 2
    assert len(set().union(*by_doc.values())) == len(by_doc)
    assert 2.0 < cpt < 6.0


def test_the_replay_takes_as_many_requests_as_the_harness_sent():
    # bench.json as the harness writes it: the generator's parameters without a request
    # count (the generator's default made them), the count the run sent beside them.
    params = {k: v for k, v in PARAMS.items() if k != "requests"}
    wl, _, _ = replay_requests({"name": "docs", "requests": 12, "params": params}, {}, 64)
    sent = build("docs", {k: v for k, v in params.items()
                          if k not in ("seed", "rate", "unique_doc_tokens")}, seed=3)
    assert len(sent.requests) > 12  # the generator's default is more
    sent.requests = sent.requests[:12]  # bench --requests 12
    sent = sent.at_rate(2.0)
    assert [r.arrival_s for r in wl.requests] == [r.arrival_s for r in sent.requests]
    assert [r.input_tokens for r in wl.requests] == [len(r.input_ids) for r in sent.requests]


def test_compare_simulates_each_measured_configuration(tmp_path):
    run = _bench(tmp_path, ["stock-rr", "stock-cache-aware", "tokenlake-rr", "other"])
    rows = compare(run)
    assert [r["config"] for r in rows] == ["stock-rr", "stock-cache-aware", "tokenlake-rr"]
    assert [r["policy"] for r in rows] == ["stock", "cache_aware", "tokenlake"]
    hit = {r["config"]: r["simulated_hit_rate"] for r in rows}
    # 3 documents over 2 workers: the pool holds each once; round robin splits them
    assert hit["tokenlake-rr"] > hit["stock-rr"] > 0
    assert rows[2]["simulated_load_cv"] == 0.0  # round robin, 30 requests on 2 workers
    assert main([str(run)]) == 0
    assert json.loads((run / "sim_vs_live.json").read_text()) == rows


def test_a_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "bench.json" in capsys.readouterr().err


def test_a_run_without_calibration_samples_is_a_clear_error(tmp_path, capsys):
    run = _bench(tmp_path, ["stock-rr"])
    bench = json.loads((run / "bench.json").read_text())
    bench["calibration"] = [{"samples": []}]
    (run / "bench.json").write_text(json.dumps(bench))
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "no calibration samples" in err and "--calibration N" in err
    assert not (run / "sim_vs_live.json").exists()


def test_the_replay_uses_the_runs_tokenlake_policy_flags():
    from sglang_tokenlake.policy import PolicyConfig
    from sglang_tokenlake.sim.live import pool_config_of

    assert pool_config_of({}).policy() == PolicyConfig()
    pol = pool_config_of({"tokenlake_args": ["--tokenlake-placement", "executor",
                                             "--tokenlake-replica-budget", "0.1"]}).policy()
    assert pol.placement == "executor" and pol.replica_budget == 0.1
    assert pol == PolicyConfig(placement="executor", replica_budget=0.1)
    # The mode a run pinned is the replay's too (a pulled copy takes memory, a shipped one not).
    assert pool_config_of({"tokenlake_args": ["--tokenlake-remote-mode", "pull"]}
                          ).policy().remote_mode == "pull"


def test_a_sweep_compares_each_rate_with_its_own_replay(tmp_path):
    run = _bench(tmp_path, ["stock-rr", "tokenlake-p2c"])
    bench = json.loads((run / "bench.json").read_text())
    slow = dict(PARAMS, rate=0.5)
    bench["meta"]["workloads"].append({"name": "docs", "params": slow})
    bench["summaries"] += [{"workload": "docs", "rate": 0.5, "config": c, "hit_rate": 0.4,
                            "load_cv_requests": 0.2} for c in ("stock-rr", "tokenlake-p2c")]
    (run / "bench.json").write_text(json.dumps(bench))
    rows = compare(run)
    # One row per measured (rate, configuration), never a rate against another's replay.
    assert [(r["rate"], r["config"]) for r in rows] == [
        (2.0, "stock-rr"), (2.0, "tokenlake-p2c"), (0.5, "stock-rr"), (0.5, "tokenlake-p2c")]
    assert [r["measured_hit_rate"] for r in rows] == [0.5, 0.5, 0.4, 0.4]
    assert {r["policy"] for r in rows if r["config"] == "tokenlake-p2c"} == {"tokenlake"}


def test_power_of_two_takes_the_less_busy_of_two_random_workers():
    from sglang_tokenlake.sim.engine import simulate
    from sglang_tokenlake.sim.model import SimConfig

    wl, _, _ = replay_requests({"name": "docs", "params": PARAMS}, {}, 64)
    cfg = SimConfig(4, 4096 // 64, 64)
    served = {ex: simulate(wl, "tokenlake", cfg.__class__(**{**cfg.__dict__,
                                                          "tokenlake_executor": ex})).served
              for ex in ("round_robin", "power_of_two")}
    assert served["round_robin"] == [8, 8, 7, 7]
    p2c = served["power_of_two"]
    assert sum(p2c) == 30 and p2c != served["round_robin"] and min(p2c) > 0


def test_cache_aware_executor_keeps_a_documents_requests_together_within_the_pool_bound():
    from dataclasses import replace

    from sglang_tokenlake.sim.engine import simulate
    from sglang_tokenlake.sim.model import SimConfig
    from sglang_tokenlake.sim.routing import CacheAwareConfig

    wl, _, _ = replay_requests({"name": "docs", "params": dict(PARAMS, rate=1000.0)}, {}, 64)
    cfg = SimConfig(4, 4096 // 64, 64, tokenlake_executor="cache_aware")
    loose = simulate(wl, "tokenlake", replace(cfg, tokenlake_router=CacheAwareConfig()))
    tight = simulate(wl, "tokenlake", cfg)
    # The router's defaults never balance 30 requests: 3 documents, at most 3 busy workers.
    assert loose.extra["router_decisions"]["imbalanced"] == 0
    assert sum(1 for n in loose.served if n) <= 3
    # The pool bound (2 requests) detours some and evens the load out.
    assert tight.extra["router_decisions"]["imbalanced"] > 0
    assert max(tight.served) - min(tight.served) < max(loose.served) - min(loose.served)
    assert sum(tight.served) == sum(loose.served) == 30
    assert tight.hit_rate > 0


def test_least_inflight_executor_is_the_harness_proxys_least_load():
    from sglang_tokenlake.sim.engine import simulate
    from sglang_tokenlake.sim.model import SimConfig
    from sglang_tokenlake.sim.workloads import Request, Workload

    a, b = (11, 12, 13), (21, 22, 23)  # two prompts' block keys (64-token blocks)
    reqs = [Request(0.0, 192, 4, a), Request(1e-4, 192, 4, b), Request(1e6, 192, 4, b)]
    cfg = SimConfig(2, 64, 64, tokenlake_executor="least_inflight")
    # A goes to w0; B, while A runs, to the idle w1; B's follow-up, with both idle, back
    # to w1 (its first 64 tokens were last served there), not to w0 next in rotation.
    assert simulate(Workload("t", 64, reqs), "tokenlake", cfg).served == [1, 2]
    reqs[2] = Request(1e6, 192, 4, (31, 32, 33))  # a new prompt: the rotation's turn
    assert simulate(Workload("t", 64, reqs), "tokenlake", cfg).served == [2, 1]


@pytest.mark.parametrize("policy", ["tokenlake", "stock_bounded"])
def test_bounded_load_routing_is_the_harness_proxys_bounded_load(policy):
    from sglang_tokenlake.sim.engine import simulate
    from sglang_tokenlake.sim.model import SimConfig
    from sglang_tokenlake.sim.workloads import Request, Workload

    a = (11, 12, 13)  # one prompt's block keys (64-token blocks)
    reqs = [Request(i * 1e-4, 192, 4, a) for i in range(3)]
    cfg = SimConfig(2, 64, 64, tokenlake_executor="bounded_load", load_factor=1.25)
    # A's first home is w0; with one request in flight the bound (ceil(1.25 * 2 / 2) = 2)
    # keeps the second there; the third would make 3 > ceil(1.25 * 3 / 2) = 2: w1.
    assert simulate(Workload("t", 64, reqs), policy, cfg).served == [2, 1]
    # The proxy's least_load spreads them at once (ties to the worker that served last).
    least = SimConfig(2, 64, 64, tokenlake_executor="least_inflight")
    assert simulate(Workload("t", 64, reqs), "tokenlake", least).served == [1, 2]
    loose = SimConfig(2, 64, 64, tokenlake_executor="bounded_load", load_factor=2.0)
    assert simulate(Workload("t", 64, reqs), policy, loose).served == [3, 0]  # bound 3
    with pytest.raises(ValueError, match="load_factor"):
        SimConfig(2, 64, 64, load_factor=0.5)


def test_the_bounded_configurations_replay_with_the_proxys_rule(tmp_path):
    rows = compare(_bench(tmp_path, ["stock-bounded", "tokenlake-bounded"]))
    assert [(r["config"], r["policy"]) for r in rows] == [
        ("stock-bounded", "stock_bounded"), ("tokenlake-bounded", "tokenlake")]
    assert all(0 < r["simulated_hit_rate"] <= 1 for r in rows)


def test_an_unknown_executor_is_an_error():
    from sglang_tokenlake.sim.model import SimConfig

    with pytest.raises(ValueError, match="tokenlake_executor"):
        SimConfig(4, 64, 64, tokenlake_executor="fastest")


def test_the_replay_routes_with_the_runs_router_thresholds(tmp_path):
    from sglang_tokenlake.sim.live import router_of
    from sglang_tokenlake.sim.routing import CacheAwareConfig

    assert router_of("stock-cache-aware", {}) == CacheAwareConfig()
    assert router_of("tokenlake-cache-aware", {}) == CacheAwareConfig.pool()
    # --router-args come after the configuration's own flags and override them
    flags = ["--balance-abs-threshold", "64", "--balance-rel-threshold=1.5", "--log-level", "warn"]
    assert router_of("tokenlake-cache-aware", {"router_args": flags}) == CacheAwareConfig()
    assert router_of("stock-cache-aware", {"router_args": ["--cache-threshold", "0.5"]}) \
        == CacheAwareConfig(cache_threshold=0.5)
    assert router_of("tokenlake-least-load", {"router_args": flags}) == CacheAwareConfig()

    run = _bench(tmp_path, ["tokenlake-cache-aware"])
    bench = json.loads((run / "bench.json").read_text())
    bench["meta"]["workloads"][0]["params"]["rate"] = 50.0  # several requests in flight
    bench["summaries"][0]["rate"] = 50.0
    (run / "bench.json").write_text(json.dumps(bench))
    tight = compare(run)
    bench["meta"]["settings"]["router_args"] = flags
    (run / "bench.json").write_text(json.dumps(bench))
    loose = compare(run)
    assert tight[0]["router_flags"] == list(CacheAwareConfig.pool().threshold_flags())
    assert loose[0]["router_flags"] == list(CacheAwareConfig().threshold_flags())
    # the thresholds reach the simulated router: without the pool bound, requests stay
    # with the worker that holds their document and detours' copies evict less
    assert loose[0]["simulated_hit_rate"] > tight[0]["simulated_hit_rate"]


def test_router_flags_without_a_number_are_an_error():
    from sglang_tokenlake.sim.routing import CacheAwareConfig

    with pytest.raises(ValueError, match="balance-abs-threshold"):
        CacheAwareConfig().with_flags(["--balance-abs-threshold"])
    with pytest.raises(ValueError, match="not a number"):
        CacheAwareConfig().with_flags(["--cache-threshold=high"])


def test_tokenlake_args_given_to_the_replay_come_after_the_runs_own(tmp_path, capsys):
    run = _bench(tmp_path, ["tokenlake-rr"])
    bench = json.loads((run / "bench.json").read_text())
    bench["meta"]["settings"].update(max_total_tokens=384,  # 6 segments: pressure
                                     tokenlake_args=["--tokenlake-spill-margin", "4"])
    (run / "bench.json").write_text(json.dumps(bench))
    on = compare(run)  # the run's own margin
    assert on[0]["simulated_spilled_segments"] > 0
    off = compare(run, ("--tokenlake-spill-margin", "0"))
    assert "simulated_spilled_segments" not in off[0]
    assert main([str(run), "--tokenlake-args=--tokenlake-spill-margin 0.5"]) == 2
    assert "spill_margin must be 0 (off) or >= 1" in capsys.readouterr().err
    assert main([str(run), "--tokenlake-args=--tokenlake-spill-margin x"]) == 2
    assert "invalid float value" in capsys.readouterr().err


def test_per_request_agreement_counts_each_request_once():
    from sglang_tokenlake.sim.live import per_request

    measured = {"a": {"cached_tokens": 512, "prompt_tokens": 600},
                "b": {"cached_tokens": 0, "prompt_tokens": 400},
                "c": {"cached_tokens": 256, "prompt_tokens": 300},
                "d": {"cached_tokens": 0, "prompt_tokens": 900, "error": "timeout"}}
    # a: within a segment (40 < 64); b: 128 apart; c: 256 apart; d failed; e not measured
    got = per_request(["a", "b", "c", "d", "e"], [472, 128, 0, 0, 64], measured, 64)
    assert got == {"requests_compared": 3, "requests_matched": 1,
                   "per_request_diff": round((40 + 128 + 256) / 1300, 4)}
    assert per_request(["x"], [0], {}, 64)["per_request_diff"] is None
    assert "executors_compared" not in got  # no record names its worker
    # With TokenLake's request log the records name their worker: a and c ran where the
    # replay ran them, b did not; the failed d is not compared.
    for rid, w in (("a", 1), ("b", 0), ("c", 2), ("d", 1)):
        measured[rid]["worker"] = w
    got = per_request(["a", "b", "c", "d", "e"], [472, 128, 0, 0, 64], measured, 64,
                      executors=[1, 1, 2, 1, 0])
    assert (got["executors_compared"], got["executors_matched"]) == (3, 2)


def test_executors_are_compared_under_the_best_naming_of_the_workers():
    from sglang_tokenlake.sim.live import same_worker

    # the live router put the first prefix on worker 2 where the replay chose 0: the same
    # grouping under other names
    assert same_worker([(0, 2), (0, 2), (1, 0), (2, 1), (1, 0)]) == 5
    assert same_worker([(0, 2), (0, 2), (0, 1), (1, 1)]) == 3  # one naming for all
    # beyond 8 workers the most frequent pairs are matched first
    pairs = [(i, (i + 1) % 10) for i in range(10)] * 2 + [(0, 0)]
    assert same_worker(pairs) == 20


def test_compare_reports_request_by_request_agreement_where_requests_were_recorded(tmp_path):
    run = _bench(tmp_path, ["stock-rr", "tokenlake-rr"])
    wl, _, rids = replay_requests({"name": "docs", "params": PARAMS}, {}, 64)
    # live, stock-rr hit nothing: every replayed hit is a difference
    recs = [{"config": "stock-rr", "workload": "docs", "rate": 2.0, "rid": rid,
             "prompt_tokens": r.input_tokens, "cached_tokens": 0, "output_ids": []}
            for rid, r in zip(rids, wl.requests)]
    (run / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = {r["config"]: r for r in compare(run)}
    rr = rows["stock-rr"]
    assert rr["requests_compared"] == 30
    assert rr["per_request_diff"] == round(rr["simulated_hit_rate"], 4) > 0
    assert 0 < rr["requests_matched"] < 30  # the first request of each document missed
    assert "requests_compared" not in rows["tokenlake-rr"]  # none recorded for it
    # the pool's last copies evicted, live (the run's counters) beside the replay's
    assert "measured_evicted_last_copies" not in rows["tokenlake-rr"]  # no counters
    bench = json.loads((run / "bench.json").read_text())
    bench["summaries"][1]["tokenlake"] = {"evicted_last_copies": 7.0}
    (run / "bench.json").write_text(json.dumps(bench))
    tl = compare(run)[1]
    assert tl["measured_evicted_last_copies"] == 7
    assert tl["simulated_evicted_last_copies"] >= 0
    assert "measured_evicted_last_copies" not in compare(run)[0]  # stock: no pool


@pytest.mark.parametrize("extra, tl, policy", [
    (["--schedule-policy", "lpm"], [], "lpm"),
    ([], ["--schedule-policy=dfs-weight"], "dfs-weight"),
    (["--enable-priority-scheduling"], [], "fcfs+priority"),
])
def test_a_run_whose_workers_reordered_their_queues_is_refused(tmp_path, capsys, extra, tl, policy):
    from sglang_tokenlake.sim.live import schedule_policy_of

    run = _bench(tmp_path, ["stock-rr"])
    bench = json.loads((run / "bench.json").read_text())
    bench["meta"]["settings"].update(extra_args=extra, tokenlake_args=tl)
    (run / "bench.json").write_text(json.dumps(bench))
    assert schedule_policy_of(bench["meta"]["settings"]) == policy
    assert main([str(run)]) == 2
    assert f"--schedule-policy {policy}" in capsys.readouterr().err
    assert not (run / "sim_vs_live.json").exists()
    bench["meta"]["settings"].update(extra_args=["--schedule-policy", "fcfs"], tokenlake_args=[])
    (run / "bench.json").write_text(json.dumps(bench))
    assert main([str(run)]) == 0  # fcfs given explicitly is the replay's own order
