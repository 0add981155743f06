"""Per-worker CPU budgets of the harness: quota arithmetic, cgroup files, the launcher, and one
real quota on a busy process tree (skipped where cgroups are not writable)."""

import math
import os
import subprocess
import sys
import time

import pytest

from sglang_tokenlake.bench import cpuquota
from sglang_tokenlake.bench.cpuquota import (
    CpuBudget,
    CpuQuotaError,
    Mechanism,
    cpu_max,
    detect,
    quota_us,
    taskset_cpus,
    threads_for,
)


def test_quota_arithmetic():
    assert quota_us(0.45) == 45_000
    assert quota_us(0.9) == 90_000
    assert quota_us(2) == 200_000  # more than one core: quota above the period
    assert quota_us(0.0001) == cpuquota.MIN_QUOTA_US  # the kernel's floor
    assert cpu_max(0.45) == "45000 100000"
    assert quota_us(0.5, period_us=50_000) == 25_000
    for bad in (0, -1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="positive number of cores"):
            quota_us(bad)
    assert [threads_for(c) for c in (0.2, 0.45, 1.0, 1.5, 2.0)] == [1, 1, 1, 2, 2]


def test_taskset_spreads_workers_over_cpus():
    assert [taskset_cpus(i, 0.45, [0, 1]) for i in range(4)] == [[0], [1], [0], [1]]
    assert taskset_cpus(1, 1.5, [4, 5, 6, 7]) == [6, 7]
    assert taskset_cpus(0, 8, [0, 1]) == [0, 1]  # never more CPUs than allowed
    with pytest.raises(CpuQuotaError):
        taskset_cpus(0, 1, [])


def _fake_v1(tmp_path):
    root = tmp_path / "cpu"
    root.mkdir()
    (root / "cpu.cfs_quota_us").write_text("-1\n")
    return root


def test_v1_cgroup_files_and_launcher(tmp_path):
    root = _fake_v1(tmp_path)
    mech = detect(v1_root=root, mounts=tmp_path / "no-mounts")
    assert mech == Mechanism("cgroup-v1", root)
    assert list(root.iterdir()) == [root / "cpu.cfs_quota_us"]  # the probe was removed
    b = CpuBudget(mech, "tokenlake-bench-1-20000", 0.45).create(limit=False)
    assert (root / b.name / "cpu.cfs_quota_us").read_text() == "-1\n"  # start-up: unlimited
    assert b.apply() is b
    assert (root / b.name / "cpu.cfs_quota_us").read_text() == "45000\n"
    assert (root / b.name / "cpu.cfs_period_us").read_text() == "100000\n"
    assert b.env() == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert b.record() == {"name": b.name, "cores": 0.45, "mechanism": "cgroup-v1",
                          "threads": 1, "quota_us": 45000, "period_us": 100000}
    # The launcher joins the cgroup with its own pid, then execs the command (same pid).
    out = subprocess.run([*b.launcher(), sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (root / b.name / "cgroup.procs").read_text().split() == [out.stdout.strip()]


def test_launcher_fails_when_the_cgroup_cannot_be_joined(tmp_path):
    b = CpuBudget(Mechanism("cgroup-v1", tmp_path / "missing"), "x", 0.5)
    out = subprocess.run([*b.launcher(), "true"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0  # the command never runs outside its budget


def test_remove_gives_up_with_a_warning_when_processes_stay(tmp_path):
    root = _fake_v1(tmp_path)
    b = CpuBudget(Mechanism("cgroup-v1", root), "stuck", 0.5).create()
    (root / "stuck" / "cgroup.procs").write_text("999999999\n")  # no such process
    t = time.monotonic()
    with pytest.warns(UserWarning, match="could not remove cgroup"):
        b.remove(timeout=0.3)
    assert time.monotonic() - t < 5


def test_v2_cgroup_enables_cpu_and_writes_cpu_max(tmp_path):
    uni = tmp_path / "unified"
    uni.mkdir()
    (uni / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (uni / "cgroup.subtree_control").write_text("\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 {uni} cgroup2 rw 0 0\n")
    mech = detect(v1_root=tmp_path / "no-v1", mounts=mounts)
    assert mech.kind == "cgroup-v2" and mech.root == uni
    assert (uni / "cgroup.subtree_control").read_text() == "+cpu\n"
    b = CpuBudget(mech, "w0", 0.9).create(limit=False)
    assert (uni / "w0" / "cpu.max").read_text() == "max 100000\n"
    b.apply()
    assert (uni / "w0" / "cpu.max").read_text() == "90000 100000\n"


def test_fallback_to_taskset_and_no_mechanism(tmp_path):
    mech = detect(v1_root=tmp_path / "no-v1", mounts=tmp_path / "none", taskset="/usr/bin/taskset")
    assert mech.kind == "taskset" and "no cgroup v1 cpu controller" in mech.note
    b = CpuBudget(mech, "w1", 0.45, index=1, allowed_cpus=[0, 1])
    assert b.create() is b and b.path is None
    assert b.launcher() == ["taskset", "-c", "1"]
    assert b.record()["cpus"] == [1]
    with pytest.raises(CpuQuotaError, match="no writable cgroup and no taskset"):
        detect(v1_root=tmp_path / "no-v1", mounts=tmp_path / "none", taskset="")


BUSY_TREE = """
import os, time
def spin(s):
    t = time.monotonic()
    while time.monotonic() - t < s:
        pass
pid = os.fork()
if pid == 0:
    spin(1.0)
    os._exit(0)
spin(1.0)
os.waitpid(pid, 0)
"""


def test_real_quota_limits_a_busy_process_tree():
    try:
        mech = detect()
    except CpuQuotaError as e:
        pytest.skip(str(e))
    if not mech.kind.startswith("cgroup"):
        pytest.skip(f"cgroups are not writable here ({mech.note})")
    b = CpuBudget(mech, f"tokenlake-test-{os.getpid()}", 0.2).create(limit=False)
    b.apply()
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen([*b.launcher(), sys.executable, "-c", BUSY_TREE])
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0
        cpu = ru.ru_utime + ru.ru_stime  # the process and its reaped child
        # Two busy processes, unlimited, would use up to 2 cores; the budget holds both to 0.2.
        assert 0 < cpu / wall <= 0.3, (cpu, wall)
        assert b.stats().get("nr_throttled", 1) > 0
    finally:
        b.remove()
    assert not b.path.exists()
    assert math.isclose(b.cores, 0.2)


def _stat(pid, comm, utime, stime):
    # /proc/PID/stat: pid (comm) state ppid ... utime is field 14, stime 15
    rest = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


def _fake_proc(root, pid, threads, ended=0):
    """A /proc entry for ``pid`` whose live threads are (tid, comm, utime, stime) and whose
    ended threads used ``ended`` ticks."""
    d = root / str(pid)
    (d / "task").mkdir(parents=True)
    (d / "stat").write_text(_stat(pid, "sglang::schedul",
                                  sum(t[2] for t in threads) + ended, sum(t[3] for t in threads)))
    for tid, comm, ut, st in threads:
        t = d / "task" / str(tid)
        t.mkdir()
        (t / "comm").write_text(comm + "\n")
        (t / "stat").write_text(_stat(tid, comm, ut, st))


def test_cpu_times_sum_processes_and_the_pool_threads(tmp_path):
    tick = 1_000_000 // os.sysconf("SC_CLK_TCK")
    _fake_proc(tmp_path, 100, [(100, "sglang::schedul", 50, 10), (101, "tl-broker", 4, 2),
                               (102, "tl-peers", 3, 0), (103, "ZMQbg/IO/0", 1, 1)], ended=7)
    _fake_proc(tmp_path, 200, [(200, "sglang::detoken", 5, 0)])
    # pid 300 is gone between listing and reading: it counts nothing.
    got = cpuquota.cpu_times([100, 200, 300], proc=tmp_path)
    # pid 100: its threads' 71 ticks + 7 of threads that ended; pid 200: 5
    assert got == {"cpu_usec": (78 + 5) * tick, "pool_threads_usec": (6 + 3) * tick}
    assert cpuquota.cpu_times([], proc=tmp_path) == {"cpu_usec": 0, "pool_threads_usec": 0}


def test_stats_carry_the_cpu_times_of_the_cgroups_processes(tmp_path):
    (tmp_path / "cg").mkdir()
    root = _fake_v1(tmp_path / "cg")
    mech = detect(v1_root=root, mounts=tmp_path / "no-mounts")
    b = CpuBudget(mech, "tokenlake-bench-1-20000", 0.45).create(limit=False)
    (root / b.name / "cpu.stat").write_text("nr_periods 10\nnr_throttled 4\nthrottled_time 9\n")
    (root / b.name / "cgroup.procs").write_text("100\n")
    b.proc = tmp_path / "proc"
    _fake_proc(b.proc, 100, [(100, "sglang::schedul", 20, 0), (101, "tl-kv-serve", 2, 1)])
    tick = 1_000_000 // os.sysconf("SC_CLK_TCK")
    assert b.stats() == {"nr_periods": 10, "nr_throttled": 4, "throttled_time": 9,
                         "cpu_usec": 23 * tick, "pool_threads_usec": 3 * tick}


def test_the_pool_thread_prefix_is_the_one_its_threads_take():
    from sglang_tokenlake.transport import threads

    assert cpuquota.POOL_THREAD_PREFIX == threads.OS_PREFIX


def test_the_summary_reports_each_workers_cpu_seconds_and_its_pool_threads():
    from sglang_tokenlake.bench.load import RequestRecord
    from sglang_tokenlake.bench.report import SLO, summarize
    from sglang_tokenlake.bench.runner import ConfigResult

    r = RequestRecord("docs-0", "doc0", output_ids=[1], ttft_s=0.1, e2e_s=0.2, prompt_tokens=4)
    cpu = [{"nr_periods": 10, "nr_throttled": 5, "throttled_time": 2_000_000_000,
            "cpu_usec": 4_500_000, "pool_threads_usec": 500_000},
           {"nr_periods": 10, "nr_throttled": 0, "throttled_time": 0,
            "cpu_usec": 1_250_000, "pool_threads_usec": 0}]
    res = ConfigResult("c", "tokenlake", "x", "docs", 1.0, [r], [], [], None, 0, 0, "", cpu)
    s = summarize(res, SLO(2.0, 0.1))
    assert s["worker_cpu_s"] == [4.5, 1.25]
    assert s["worker_pool_threads_cpu_s"] == [0.5, 0.0]
    assert s["worker_cpu_throttled_s"] == [2.0, 0.0]
    # A budget without CPU times (taskset): no such fields.
    res.cpu = [{"nr_periods": 10, "nr_throttled": 0}]
    assert "worker_cpu_s" not in summarize(res, SLO(2.0, 0.1))
