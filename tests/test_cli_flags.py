"""The launcher: flags are documented in --help; wrong values fail fast and clearly."""

import subprocess
import sys

import pytest

LAUNCH = [sys.executable, "-m", "sglang.launch_server"]


def run(args, timeout=600):  # generous: eight launchers import SGLang at once on 2 cores
    return subprocess.run(LAUNCH + args, capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_flag():
    import dataclasses

    from sglang_tokenlake.config import TokenLakeConfig

    out = run(["--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert "--cache-backend {radix,tokenlake}" in text
    for f in dataclasses.fields(TokenLakeConfig):
        flag = f"--tokenlake-{f.name.replace('_', '-')}"
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split())[:40] in text, flag


BAD = [
        (["--page-size", "16", "--tokenlake-segment-size", "24"], "must be a multiple of --page-size (16)"),
        (["--tokenlake-segment-size", "0"], "--tokenlake-segment-size must be positive"),
        (["--enable-hierarchical-cache"], "cannot be combined with: --enable-hierarchical-cache"),
        (["--radix-eviction-policy", "lfu"], "--radix-eviction-policy lfu"),
        (["--radix-cache-backend", "flexkv"], "conflicts with --radix-cache-backend flexkv"),
        (["--tp-size", "2"], "supports --tp-size 1 only"),
        (["--tokenlake-host", "10.0.0.2"], "or --tokenlake-insecure to serve the pool unauthenticated"),
        (["--device", "cuda", "--disable-overlap-schedule", "--tokenlake-remote-mode", "ship"],
         "CUDA graphs cover the decode and prefill passes"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad invocation, run concurrently (each pays SGLang's import time)."""
    from concurrent.futures import ThreadPoolExecutor

    model = str(tmp_path_factory.mktemp("no-model"))
    with ThreadPoolExecutor(len(BAD)) as pool:
        return list(pool.map(
            lambda a: run(["--model-path", model, "--cache-backend", "tokenlake", *a[0]]), BAD
        ))


@pytest.mark.parametrize("case", range(len(BAD)), ids=[" ".join(a) for a, _ in BAD])
def test_wrong_flags_fail_at_start_up(case, bad_runs):
    out, message = bad_runs[case], BAD[case][1]
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    assert "sglang-tokenlake:" in out.stderr


def test_readme_documents_every_flag():
    import dataclasses
    from pathlib import Path

    from sglang_tokenlake.config import TokenLakeConfig

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "--cache-backend" in readme
    for f in dataclasses.fields(TokenLakeConfig):
        assert f"--tokenlake-{f.name.replace('_', '-')}" in readme, f.name


def test_status_prints_the_pools_failures_by_cause(capsys):
    from sglang_tokenlake.cli import _print_status

    st = {"worker": "w0", "segment_size": 64, "page_size": 16, "local_segments": 3,
          "known_segments": 5,
          "memory": {"capacity": 8, "free": 1, "cached": 7, "locked": 0, "evictable": 7,
                     "held_by_requests": 0},
          "stats": {"requests": 2, "hit_tokens": 64, "miss_tokens": 64, "hit_rate": 0.5,
                    "evicted_segments": 1},
          "pool": {"members": [{"id": "w0", "self": True, "alive": True}],
                   "designated_segments": 3, "transient_segments": 0,
                   "remote_segments_by_owner": {},
                   "counters": {"pulled_segments": 4, "pull_failures": 2, "pull_not_found": 1,
                                "pull_errors": 1, "pull_no_owner": 0, "lease_failures": 0}}}
    _print_status(st)
    out = capsys.readouterr().out
    assert "failures: {'pull_failures': 2, 'pull_not_found': 1, 'pull_errors': 1}" in out
    assert "'pulled_segments': 4" in out  # moved, not a failure
