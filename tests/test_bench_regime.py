"""The benchmark regime without servers: the longdoc workload, the sweep's ladder, stop rule
and read-out, the report and plot of a sweep, the router front ends and CPU budgets of the
configurations."""

import json
from collections import Counter

import pytest

from sglang_tokenlake.bench import __main__ as cli
from sglang_tokenlake.bench import sweep
from sglang_tokenlake.bench.cpuquota import CpuBudget, Mechanism
from sglang_tokenlake.bench.frontends import FRONTENDS, Frontend
from sglang_tokenlake.bench.runner import (
    CONFIGS,
    DEFAULT_CONFIGS,
    ClusterSettings,
    _frontend_kind,
    worker_specs,
)
from sglang_tokenlake.bench.workloads import LONGDOC_MAX_TOTAL_TOKENS, build
from sglang_tokenlake.cluster import PoolSpec


def test_longdoc_shape():
    w = build("longdoc", {"contexts": 8, "requests": 300})
    assert w.name == "longdoc" and len(w.requests) == 300
    lens = w.params["context_tokens"]
    assert len(lens) == 8 and all(3072 <= n <= 6144 for n in lens)
    by_ctx = {}
    for r in w.requests:
        ctx = int(r.group.removeprefix("ctx"))
        q = len(r.input_ids) - lens[ctx]
        assert 16 <= q <= 32, q  # short question after the whole context
        assert r.max_new_tokens == 16 and r.parent is None
        assert all(3 <= t < 1024 for t in r.input_ids)
        by_ctx.setdefault(ctx, r.input_ids[:lens[ctx]])
        assert r.input_ids[:lens[ctx]] == by_ctx[ctx]  # the context is shared exactly
    assert len(by_ctx) == 8
    # Every request fits the suggested per-worker KV; it holds one or two contexts.
    assert max(len(r.input_ids) + r.max_new_tokens for r in w.requests) < LONGDOC_MAX_TOTAL_TOKENS
    assert LONGDOC_MAX_TOTAL_TOKENS // max(lens) >= 1 and LONGDOC_MAX_TOTAL_TOKENS // 3072 <= 2
    arrivals = [r.arrival_s for r in w.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


def test_longdoc_zipf_skew_and_seed():
    w = build("longdoc", {"contexts": 8, "requests": 2000})
    counts = Counter(int(r.group.removeprefix("ctx")) for r in w.requests)
    share = [counts[i] / 2000 for i in range(8)]
    # Zipf(1.0) over 8 ranks: p1 = 1 / H8 = 0.368, p8 = 0.046.
    assert 0.32 < share[0] < 0.42 and share[7] < 0.08
    assert share[0] > share[1] > share[3] > share[7]
    a, b = build("longdoc", {"requests": 50}, seed=3), build("longdoc", {"requests": 50}, seed=3)
    assert a.requests == b.requests
    assert build("longdoc", {"requests": 50}, seed=4).requests != a.requests
    with pytest.raises(ValueError, match="context_min_tokens"):
        build("longdoc", {"context_min_tokens": 500, "context_max_tokens": 100})


def test_cli_sizes_longdoc_to_the_workers_and_checks_the_fit():
    with pytest.raises(SystemExit):  # the proxy would refuse it after the workers started
        cli.parse_args(["--load-factor", "0.5"])
    assert cli.parse_args(["--load-factor", "1.5"]).load_factor == 1.5
    a = cli.parse_args(["--workers", "3", "--workload", "longdoc", "--requests", "5"])
    (w,) = cli.build_workloads(a)
    assert w.params["contexts"] == 6 and len(w.requests) == 5
    a = cli.parse_args(["--workers", "3", "--workload", "longdoc",
                        "--workload-arg", "longdoc.contexts=4"])
    assert cli.build_workloads(a)[0].params["contexts"] == 4
    with pytest.raises(SystemExit, match="more than --max-total-tokens 4096"):
        cli.check_fit([w], 4096)
    cli.check_fit([w], LONGDOC_MAX_TOTAL_TOKENS)


def test_sweep_ladder():
    assert sweep.geometric(1.0, 2.0, 4) == [1.0, 2.0, 4.0, 8.0]
    assert sweep.geometric(1.0, 2.0, 4, max_rate=5) == [1.0, 2.0, 4.0]
    for bad in ((0, 2, 3), (1, 1, 3), (1, 2, 0)):
        with pytest.raises(ValueError):
            sweep.geometric(*bad)
    a = cli.parse_args(["--workload", "longdoc", "--sweep", "--rates", "0.4",
                        "--sweep-factor", "2", "--sweep-steps", "3"])
    w = cli.build_workloads(a)[0]
    assert cli.rate_steps(a, w) == [0.4, 0.8, 1.6]
    a = cli.parse_args(["--sweep", "--rates", "3", "1", "2"])
    assert cli.rate_steps(a, w) == [1.0, 2.0, 3.0]
    a = cli.parse_args(["--rates", "3", "1"])
    assert cli.rate_steps(a, w) == [3.0, 1.0]  # no sweep: as listed


def _s(config, rate, goodput, attain, ttft):
    return {"config": config, "workload": "longdoc", "rate": rate, "goodput_rps": goodput,
            "slo_attainment": attain, "ttft_p50_s": ttft, "ttft_p99_s": 2 * ttft}


SWEEP = [
    _s("stock-cache-aware", 0.5, 0.5, 1.0, 0.3), _s("tokenlake-p2c", 0.5, 0.5, 1.0, 0.2),
    _s("stock-cache-aware", 1.0, 0.9, 0.9, 0.6), _s("tokenlake-p2c", 1.0, 1.0, 1.0, 0.3),
    _s("stock-cache-aware", 2.0, 1.2, 0.6, 2.5), _s("tokenlake-p2c", 2.0, 1.7, 0.85, 1.1),
]


def test_sweep_stop_rule_and_read_out():
    assert not sweep.saturated(SWEEP[2:4]) and sweep.saturated(SWEEP[4:6])
    assert sweep.best_attainment([{"slo_attainment": None}]) == 0.0
    (a,) = sweep.analyze(SWEEP)
    assert a["saturated"] and a["rates"] == [0.5, 1.0, 2.0]
    assert a["reference"] == "stock-cache-aware" and a["reference_peak_goodput_rps"] == 1.2
    assert a["half_reference_peak_rps"] == 0.6 and a["nearest_rate"] == 0.5
    rows = {r["config"]: r for r in a["configs"]}
    assert rows["tokenlake-p2c"]["peak_goodput_rps"] == 1.7
    assert rows["tokenlake-p2c"]["peak_rate"] == 2.0
    assert rows["tokenlake-p2c"]["ttft_p50_at_half_s"] == 0.2
    assert rows["stock-cache-aware"]["ttft_p50_at_half_s"] == 0.3
    md = "\n".join(sweep.markdown([a]))
    assert "nearest measured rate, **0.5 req/s**" in md and "| tokenlake-p2c | 1.700 | 2 |" in md
    (b,) = sweep.analyze(SWEEP[:4])
    assert not b["saturated"]
    assert "Not saturated" in "\n".join(sweep.markdown([b]))


def test_sweep_plot(tmp_path):
    from sglang_tokenlake.bench import plots

    (a,) = sweep.analyze(SWEEP)
    plots.goodput_vs_rate(SWEEP, tmp_path / "g.png", a)
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_every_policy_the_router_has_runs_behind_the_router():
    # The proxy serves only the policies the router does not have.
    assert {k: FRONTENDS[c.frontend][1] for k, c in CONFIGS.items()
            if FRONTENDS[c.frontend][0] == "proxy"} == {
        "tokenlake-least-load": "least_load", "tokenlake-bounded": "bounded_load",
        "stock-bounded": "bounded_load"}
    assert CONFIGS["stock-bounded"].backend == "radix"
    assert set(DEFAULT_CONFIGS) == set(CONFIGS) - {"tokenlake-bounded", "stock-bounded"}
    assert CONFIGS["tokenlake-p2c"].backend == "tokenlake"
    s = ClusterSettings(model="m")
    assert _frontend_kind(CONFIGS["tokenlake-rr"], s) == "router-round_robin"
    s.rr_frontend = "proxy"
    assert _frontend_kind(CONFIGS["stock-rr"], s) == "proxy-round_robin"
    fe = Frontend("router-power_of_two", ["http://127.0.0.1:1"], "/tmp")
    argv = fe.argv()
    assert "sglang_router.launch_router" in argv
    assert argv[argv.index("--policy") + 1] == "power_of_two"


def test_tokenlake_behind_the_cache_aware_router_is_balanced_within_two_requests():
    from sglang_tokenlake.bench.runner import frontend_flags

    cfg = CONFIGS["tokenlake-cache-aware"]
    assert (cfg.backend, cfg.frontend) == ("tokenlake", "router-cache_aware")
    s = ClusterSettings(model="m", router_args=["--balance-abs-threshold", "5"])
    kind = _frontend_kind(cfg, s)
    flags = frontend_flags(cfg, s, kind)
    argv = Frontend(kind, ["http://127.0.0.1:1"], "/tmp", flags).argv()
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    at = [i for i, a in enumerate(argv) if a == "--balance-abs-threshold"]
    assert [argv[i + 1] for i in at] == ["2", "5"]  # the pool's bound, then the user's (wins)
    assert argv[argv.index("--balance-rel-threshold") + 1] == "1"
    # Stock SGLang behind the same router keeps the router's defaults.
    assert frontend_flags(CONFIGS["stock-cache-aware"], ClusterSettings(model="m"),
                          "router-cache_aware") == []


def test_workers_start_inside_their_budgets(tmp_path):
    s = ClusterSettings(model="m", workers=2, cpu_quota=0.45, device="cpu")
    pool = PoolSpec((21001, 21002))
    mech = Mechanism("cgroup-v1", tmp_path)
    budgets = [CpuBudget(mech, f"b{i}", 0.45) for i in range(2)]
    specs = worker_specs(CONFIGS["tokenlake-p2c"], s, {"X": "1"}, budgets=budgets, pool=pool)
    assert [sp.port for sp in specs] == [21001, 21002]
    for sp, b in zip(specs, budgets):
        argv = sp.argv()
        assert argv[:4] == b.launcher() and argv[4:7] == [argv[4], "-m", "sglang.launch_server"]
        assert sp.env == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "X": "1"}
        assert "--tokenlake-peers" in argv
    plain = worker_specs(CONFIGS["stock-rr"], s, pool=pool)
    assert plain[0].argv()[1:3] == ["-m", "sglang.launch_server"] and plain[0].env == {}
    with pytest.raises(ValueError, match="CPU budgets"):
        worker_specs(CONFIGS["stock-rr"], s, budgets=budgets[:1], pool=pool)
    json.dumps(vars(s))  # recorded as-is in bench.json


def test_each_workload_is_judged_by_its_own_slo(tmp_path):
    from sglang_tokenlake.bench import report
    from sglang_tokenlake.bench.load import RequestRecord
    from sglang_tokenlake.bench.runner import ConfigResult

    assert report.slo_for("longdoc") == report.SLO(8.0, 0.2)
    assert report.slo_for("docs") == report.slo_for("mooncake-synthetic") == report.SLO(2.0, 0.1)
    assert report.slo_for("longdoc", ttft_s=3.0) == report.SLO(3.0, 0.2)
    assert report.slo_for("docs", tbt_s=0.5) == report.SLO(2.0, 0.5)

    def result(wl):  # TTFT 1 s / 5 s / 9 s, mean TBT 0.15 s
        recs = [RequestRecord(f"{wl}-{i}", "g", sent_s=float(i), ttft_s=t, e2e_s=t + 1,
                              tbt_s=[0.1, 0.2], prompt_tokens=10, output_tokens=3)
                for i, t in enumerate((1.0, 5.0, 9.0))]
        return ConfigResult("stock-rr", "radix", "router", wl, 1.0, recs, [], [], None,
                            0.0, 0.0, "")

    a = cli.parse_args(["--workload", "docs", "longdoc"])
    slos = {w.name: report.slo_for(w.name, a.slo_ttft, a.slo_tbt)
            for w in cli.build_workloads(a)}
    doc = report.write(tmp_path, {"command": "x", "settings": {
        "workers": 1, "model": "m", "dtype": "f", "page_size": 1, "segment_size": 64,
        "max_total_tokens": 1, "device": "cpu"}}, [result("docs"), result("longdoc")], slos)
    att = {s["workload"]: s["slo_attainment"] for s in doc["summaries"]}
    # docs: TBT 0.15 > 0.1 fails all; longdoc: TTFT <= 8 and TBT <= 0.2 passes two of three.
    assert att == {"docs": 0.0, "longdoc": round(2 / 3, 4)}
    assert doc["meta"]["slo"]["longdoc"] == {"ttft_s": 8.0, "tbt_s": 0.2}
    md = (tmp_path / "bench.md").read_text()
    assert "longdoc: TTFT <= 8 s and mean TBT <= 0.2 s" in md


def test_tokenlake_workers_share_a_request_log_and_records_learn_their_worker(tmp_path):
    from sglang_tokenlake.bench.load import RequestRecord
    from sglang_tokenlake.bench.runner import attribute
    from sglang_tokenlake.request_log import RequestLog, read

    s = ClusterSettings(model="m", workers=2, device="cpu",
                        tokenlake_args=["--tokenlake-remote-mode", "pull"])
    pool = PoolSpec((21001, 21002))
    log = tmp_path / "requests.jsonl"
    for sp in worker_specs(CONFIGS["tokenlake-p2c"], s, pool=pool, request_log=log):
        argv = sp.argv()
        # the harness's log first: a --tokenlake-request-log in the run's own flags wins
        assert argv.index("--tokenlake-request-log") < argv.index("--tokenlake-remote-mode")
        assert argv[argv.index("--tokenlake-request-log") + 1] == str(log)
    stock = worker_specs(CONFIGS["stock-rr"], s, pool=pool, request_log=log)
    assert "--tokenlake-request-log" not in stock[0].argv()
    # Two workers append to one file; the records find their lines by SGLang's rid.
    w0, w1 = pool.broker_addrs
    RequestLog(str(log)).write("warm-up", w0, 64, 0)
    RequestLog(str(log)).write("abc", w1, 600, 512, (448, 0))
    RequestLog(str(log)).write("def", w0, 600, 512)
    with open(log, "a") as f:
        f.write('{"rid": "torn"')  # a worker stopped mid-line
    recs = [RequestRecord("docs-0", "d0", server_rid="abc"),
            RequestRecord("docs-1", "d0", server_rid="def"),
            RequestRecord("docs-2", "d1", server_rid="gone"), RequestRecord("docs-3", "d1")]
    assert [r["rid"] for r in read(str(log))] == ["warm-up", "abc", "def"]
    assert attribute(recs, read(str(log)), pool.broker_addrs) == 2
    assert [(r.worker, r.pulled_tokens, r.shipped_tokens) for r in recs] == [
        (1, 448, 0), (0, 0, 0), (None, None, None), (None, None, None)]


def test_a_request_log_in_a_missing_folder_is_refused(tmp_path):
    from sglang_tokenlake.config import TokenLakeConfig

    with pytest.raises(ValueError, match="request-log.*not a file in an existing folder"):
        TokenLakeConfig(request_log=str(tmp_path / "nowhere" / "r.jsonl"))
    with pytest.raises(ValueError, match="request-log"):
        TokenLakeConfig(request_log="")
    with pytest.raises(ValueError, match="request-log"):
        TokenLakeConfig(request_log=str(tmp_path))  # a folder
    assert TokenLakeConfig(request_log=str(tmp_path / "r.jsonl")).request_log


def test_a_failed_request_log_write_ends_the_log_without_failing_the_request(tmp_path,
                                                                             monkeypatch):
    import os

    from sglang_tokenlake.request_log import RequestLog, read

    log = RequestLog(str(tmp_path / "r.jsonl"))
    log.write("a", None, 10, 0)

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    log.write("b", None, 10, 0)  # no exception
    monkeypatch.undo()
    log.write("c", None, 10, 0)  # the log ended: nothing more
    assert [r["rid"] for r in read(str(tmp_path / "r.jsonl"))] == ["a"]
