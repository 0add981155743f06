"""Smoke test of the benchmark harness: real workers, real sglang-router, one command.

Two workers, eight requests over two shared documents, two configurations that
between them use both kinds of front end (sglang-router, cache-aware; the proxy's
least-load) and both cache backends. Router round-robin differs from cache-aware
only in its policy argument (``test_bench_regime.py`` checks the mapping); a third
configuration would add two worker start-ups, about two minutes of CI. Speed is never
asserted: only that the outputs exist, the numbers add up, outputs match token for
token and every process the harness started is gone.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_tokenlake.bench.proxy import Balancer
from sglang_tokenlake.bench.report import mismatches
from sglang_tokenlake.bench.workloads import build
from sglang_tokenlake.cluster import BROKER_PORT_OFFSET, port_is_free

pytestmark = pytest.mark.server

CONFIGS = ["stock-cache-aware", "tokenlake-least-load"]


def _bench(out: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    # Generous: on a busy 2-core host one worker start-up alone has taken 4-6 minutes.
    return subprocess.run([sys.executable, "-m", "sglang_tokenlake.bench", "--out", str(out),
                           "--no-progress", *args], capture_output=True, text=True,
                          timeout=timeout)


def _ports_of(log_root: Path) -> list[int]:
    """HTTP ports of every worker and front end the run started (from its log names)."""
    return [int(m.group(1)) for p in log_root.rglob("*.log")
            if (m := re.search(r"-(\d+)\.log$", p.name))]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _bench(out, "--model", tiny_model, "--workers", "2", "--configs", *CONFIGS,
                  "--workload", "docs", "--requests", "8", "--rates", "4",
                  "--workload-arg", "docs.documents=2", "--workload-arg", "docs.doc_tokens=320",
                  "--workload-arg", "docs.output_tokens=6", "--max-total-tokens", "4096",
                  "--warmup", "1", "--calibration", "1")
    return out, proc


def test_one_command_writes_json_markdown_and_plots(run):
    out, proc = run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("bench.json", "bench.md", "requests.jsonl", "docs_r4_summary.png",
                 "docs_r4_ttft_cdf.png", "docs_r4_workers.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "bench.md").read_text()
    assert "identical token for token" in md
    for c in CONFIGS:
        assert f"| {c} |" in md


def test_numbers_are_sane(run):
    out, proc = run
    doc = json.loads((out / "bench.json").read_text())
    assert [s["config"] for s in doc["summaries"]] == CONFIGS
    assert doc["mismatches"] == [] and doc["failed_requests"] == 0
    for s in doc["summaries"]:
        assert s["completed"] == s["requests"] == 8
        assert s["cached_tokens"] + s["tokens_prefilled"] == s["prompt_tokens"]
        assert 0.0 <= s["hit_rate"] <= 1.0
        assert s["throughput_rps"] > 0 and s["makespan_s"] > 0
        assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"] <= s["e2e_p99_s"]
        assert s["output_tokens"] == sum(r.max_new_tokens for r in
                                         build("docs", {"documents": 2, "doc_tokens": 320,
                                                        "output_tokens": 6}).requests[:8])
        # Every measured request was served by exactly one worker.
        assert sum(s["worker_requests"]) == 8, s["worker_requests"]
        assert len(s["worker_requests"]) == 2
        assert s["load_cv_requests"] >= 0
        assert 0 < s["calibration"]["prefill_share_uncached"] < 1
    tl = doc["summaries"][1]
    assert sum(tl["worker_tokenlake_hit_tokens"]) + sum(tl["worker_tokenlake_miss_tokens"]) > 0
    # Eight questions over two documents: every configuration hits the cache.
    assert all(s["cached_tokens"] > 0 for s in doc["summaries"])
    assert len(doc["ratios"]) == 1  # tokenlake-least-load vs the stock configuration
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 8
    # TokenLake's workers logged every request: where it ran agrees with their counters.
    recs = [json.loads(line) for line in lines]
    for cfg, s in zip(CONFIGS, doc["summaries"]):
        mine = [r for r in recs if r["config"] == cfg]
        assert all(r["server_rid"] for r in mine)
        if cfg.startswith("stock"):
            assert all(r["worker"] is None for r in mine)
            continue
        assert [sum(r["worker"] == i for r in mine) for i in range(2)] == s["worker_requests"]
        assert all(0 <= r["pulled_tokens"] + r["shipped_tokens"] <= r["cached_tokens"]
                   for r in mine)


def test_every_process_is_stopped(run):
    out, _ = run
    ports = _ports_of(out / "logs")
    assert len(ports) == 2 * (2 + 1)  # two workers and a front end per configuration
    for p in ports:
        assert port_is_free(p), f"port {p} still in use after the run"
    for p in ports[:2]:
        assert port_is_free(p + BROKER_PORT_OFFSET)


def test_a_worker_that_fails_to_start_is_reported_and_cleaned_up(tiny_model, tmp_path):
    proc = _bench(tmp_path, "--model", tiny_model, "--workers", "2", "--configs", "stock-rr",
                  "--requests", "2", "--worker-args=--no-such-flag", "--startup-timeout", "120",
                  timeout=300)
    assert proc.returncode == 1
    assert "no-such-flag" in proc.stderr  # the worker's log tail is shown
    assert "stopped on an error" in proc.stderr
    for p in _ports_of(tmp_path / "logs"):
        assert port_is_free(p)


def test_balancer_policies():
    rr = Balancer(3, "round_robin")
    assert [rr.pick() for _ in range(4)] == [0, 1, 2, 0]
    ll = Balancer(3, "least_load")
    a, b = ll.pick(), ll.pick()
    assert (a, b) == (0, 1)
    ll.release(a)
    assert ll.pick() == 2 and ll.pick() == 0  # 2 is idle; then 0 (released) beats busy 1


def test_least_load_ties_go_to_the_worker_that_served_the_prefix():
    import json

    from sglang_tokenlake.bench.proxy import AFFINITY_TOKENS, affinity_key

    doc = list(range(AFFINITY_TOKENS))
    key = affinity_key(json.dumps({"input_ids": doc + [1, 2]}).encode())
    assert key == affinity_key(json.dumps({"input_ids": doc + [7]}).encode())
    assert key != affinity_key(json.dumps({"input_ids": [5] + doc}).encode())
    assert affinity_key(b"not json") is None and affinity_key(b"[1]") is None
    assert affinity_key(json.dumps({"text": "abc"}).encode()) is not None
    ll = Balancer(3, "least_load")
    assert ll.pick(key) == 0
    ll.release(0)
    assert ll.pick() == 1 and ll.pick(key) == 0  # idle 0 and 2 tie: 0 served the prefix
    assert ll.pick(key) == 2  # 0 is busy now: load wins over affinity
    ll.release(0), ll.release(1), ll.release(2)
    assert ll.pick(key) == 2 and ll.affine == 2  # 2 served it last (0 was next in turn)
    rr = Balancer(3, "round_robin")
    assert [rr.pick(key) for _ in range(3)] == [0, 1, 2]


def test_bounded_load_keeps_a_prefix_on_its_homes_and_overflows_to_one_more():
    b = Balancer(4, "bounded_load", load_factor=1.25)
    A, B = 101, 202  # two prefixes (affinity keys)
    assert b.pick(A) == 0  # a new prefix: the least loaded worker is its first home
    assert b.pick(B) == 1  # the next least loaded (rotation after the last pick)
    # In flight [1, 1, 0, 0]: the bound with one more is ceil(1.25 * 3 / 4) = 1, and home
    # 0 would hold 2: the least loaded worker becomes A's second home.
    assert b.bound() == 1 and b.pick(A) == 2 and b.overflows == 1
    assert b.bound() == 2 and b.pick(A) == 0  # [1, 1, 1, 0]: home 0 within the bound again
    assert b.pick(A) == 2  # [2, 1, 1, 0], bound 2: the first home is full, the second not
    assert b.pick(A) == 3 and b.overflows == 2  # [2, 1, 2, 0], bound 2: both full -> a third
    assert b.inflight == [2, 1, 2, 1] and b.sent == [2, 1, 2, 1]
    for i in (0, 0, 1, 2, 2, 3):
        b.release(i)
    assert [b.pick(A) for _ in range(3)] == [0, 2, 3]  # homes in order, each within its bound
    assert b.pick(None) == 1  # no prefix: the least loaded
    with pytest.raises(ValueError, match="load_factor"):
        Balancer(2, "bounded_load", load_factor=0.9)
    with pytest.raises(ValueError, match="load_factor"):
        Balancer(2, "bounded_load", load_factor=float("nan"))


def test_bounded_load_never_exceeds_its_bound_and_sends_a_prefix_only_to_its_homes():
    import random

    rng = random.Random(7)
    b = Balancer(5, "bounded_load", load_factor=1.5)
    homes: dict[int, list[int]] = {}
    busy: list[int] = []
    for _ in range(3000):
        if busy and rng.random() < 0.45:
            b.release(busy.pop(rng.randrange(len(busy))))
            continue
        prefix = min(int(rng.paretovariate(1.0)), 12)  # a few hot prefixes, a tail
        cap = b.bound()
        i = b.pick(prefix)
        busy.append(i)
        assert b.inflight[i] <= cap  # the bound holds for the chosen worker
        assert b.inflight == [busy.count(w) for w in range(5)]
        if i not in homes.setdefault(prefix, []):
            # A new home only when every earlier home was at the bound.
            assert all(b.inflight[h] + 1 > cap for h in homes[prefix])
            homes[prefix].append(i)
    assert b.overflows == sum(len(h) - 1 for h in homes.values())
    assert 0 < b.overflows and b.affine > 1000


def test_the_proxys_picks_in_the_measured_phase_reach_the_summary():
    from sglang_tokenlake.bench.load import RequestRecord
    from sglang_tokenlake.bench.report import SLO, summarize
    from sglang_tokenlake.bench.runner import ConfigResult, frontend_delta

    b = Balancer(2, "bounded_load", load_factor=1.25)
    before = {"policy": "bounded_load", "sent": list(b.sent), "affinity_picks": b.affine,
              "overflows": b.overflows, "load_factor": b.load_factor}
    b.pick(7), b.pick(7), b.pick(7)  # the third overflows to worker 1
    after = {"policy": "bounded_load", "sent": list(b.sent), "affinity_picks": b.affine,
             "overflows": b.overflows, "load_factor": b.load_factor}
    delta = frontend_delta(before, after)
    assert delta == {"policy": "bounded_load", "sent": [2, 1], "affinity_picks": 1,
                     "overflows": 1, "load_factor": 1.25}
    assert frontend_delta(None, after) is None  # behind the router: nothing to read
    r = RequestRecord("docs-0", "doc0", output_ids=[1], ttft_s=0.1, e2e_s=0.2, prompt_tokens=4)
    res = ConfigResult("c", "radix", "proxy-bounded_load", "docs", 1.0, [r], [], [], delta,
                       0, 0, "")
    assert summarize(res, SLO(2.0, 0.1))["frontend_stats"] == delta


def test_mismatch_detection_names_the_request():
    from sglang_tokenlake.bench.load import RequestRecord
    from sglang_tokenlake.bench.runner import ConfigResult

    def res(name, ids):
        r = RequestRecord("docs-0", "doc0", output_ids=ids)
        return ConfigResult(name, "radix", "x", "docs", 1.0, [r], [], [], None, 0, 0, "")

    m = mismatches([res("a", [1, 2, 3]), res("b", [1, 2, 3]), res("c", [1, 9, 3])])
    assert len(m) == 1 and m[0]["rid"] == "docs-0" and m[0]["first_diff"] == 1
    assert m[0]["config"].startswith("c@")


def test_the_proxy_resends_a_request_whose_connection_the_worker_closed_unanswered():
    """A worker may close an idle keep-alive connection just as the proxy reuses it: the
    request is never read. The proxy sends it once more instead of failing it."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from sglang_tokenlake.bench.proxy import make_app

    async def scenario():
        conns = []

        async def upstream(reader, writer):
            conns.append(writer)
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-length")))
            body = await reader.readexactly(n)
            if len(conns) == 1:  # the first connection closes without an answer
                writer.close()
                return
            out = b'{"echo": ' + body + b"}"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(out), out))
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(upstream, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        runner = web.AppRunner(make_app([f"http://127.0.0.1:{port}"], "round_robin"))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        proxy_port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as c:
                async with c.post(f"http://127.0.0.1:{proxy_port}/generate",
                                  json={"input_ids": [1, 2]}) as r:
                    return r.status, await r.json(), len(conns)
        finally:
            await runner.cleanup()
            srv.close()

    status, body, connections = asyncio.run(scenario())
    assert (status, body, connections) == (200, {"echo": {"input_ids": [1, 2]}}, 2)
