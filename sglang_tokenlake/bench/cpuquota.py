"""Per-worker CPU budgets: each worker's process tree gets its own share of the host's cores.

    mech = detect()                      # cgroup v1 cpu, cgroup v2, or taskset
    b = CpuBudget(mech, "tokenlake-bench-123-20417", cores=0.45)
    b.create(limit=False)                # the cgroup, no quota yet
    argv = [*b.launcher(), sys.executable, "-m", "sglang.launch_server", ...]
    env = {**os.environ, **b.env()}      # torch / OpenMP threads = ceil(cores)
    ...                                  # the worker is ready
    b.apply()                            # the quota holds from here on
    ...
    b.remove()                           # after the worker stopped

The harness creates the cgroup unlimited and applies the quota once the worker
answers: start-up (imports, model load) is not measured, and on a small shared host
a quota from the first instruction makes it take minutes.

With a cgroup the budget is a CFS quota: ``cores`` x the period (100 ms) of CPU time per
period, whatever the number of threads or processes. The launcher is a shell that writes its
own pid into the cgroup's ``cgroup.procs`` and then ``exec``s the worker, so the server and
every process it forks (scheduler, detokenizer) are born inside the cgroup. Processes started
by the harness itself (front end, load generator) stay where they are, outside every budget.

Mechanisms, in order of preference:

* ``cgroup-v1``: a writable ``cpu`` controller (``/sys/fs/cgroup/cpu``): ``cpu.cfs_quota_us``
  and ``cpu.cfs_period_us``;
* ``cgroup-v2``: a writable unified hierarchy whose ``cgroup.controllers`` lists ``cpu``:
  ``cpu.max`` in a child cgroup (``+cpu`` is enabled in the root's ``cgroup.subtree_control``);
* ``taskset``: no writable cgroup (not root, read-only mount). CPU affinity only pins each
  worker to ``ceil(cores)`` whole CPUs, assigned round robin, so workers that share a CPU
  compete for it: not a quota, and the harness warns.

Plain Python and the standard library only (the tests point ``detect`` at a temporary
directory standing in for the cgroup root).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
PROC = Path("/proc")
# transport/threads.OS_PREFIX (not imported: this module is the standard library only)
POOL_THREAD_PREFIX = "tl-"
MOUNTS = Path("/proc/self/mounts")
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the kernel refuses smaller CFS quotas
# Writes its own pid into the cgroup ($0), then becomes the worker: children inherit it.
JOIN_AND_EXEC = 'echo $$ > "$0" && exec "$@"'


class CpuQuotaError(RuntimeError):
    """No way to give workers a CPU budget on this host, or a budget could not be set."""


def quota_us(cores: float, period_us: int = PERIOD_US) -> int:
    """CFS quota (µs of CPU time per ``period_us``) for ``cores`` cores."""
    if not (isinstance(cores, (int, float)) and math.isfinite(cores) and cores > 0):
        raise ValueError(f"--cpu-quota must be a positive number of cores, got {cores!r}")
    return max(MIN_QUOTA_US, int(round(cores * period_us)))


def cpu_max(cores: float, period_us: int = PERIOD_US) -> str:
    """The cgroup v2 ``cpu.max`` line: ``"<quota> <period>"``."""
    return f"{quota_us(cores, period_us)} {period_us}"


def threads_for(cores: float) -> int:
    """Torch / OpenMP threads for a budget of ``cores``: one per started core, at least one."""
    return max(1, math.ceil(cores - 1e-9))


def taskset_cpus(index: int, cores: float, allowed: Sequence[int]) -> list[int]:
    """The CPUs of worker ``index`` under the taskset fallback: ``ceil(cores)`` of ``allowed``,
    consecutive, assigned round robin so that workers spread over all CPUs."""
    cpus = sorted(allowed)
    if not cpus:
        raise CpuQuotaError("no CPU in this process's affinity mask")
    k = min(threads_for(cores), len(cpus))
    return [cpus[(index * k + j) % len(cpus)] for j in range(k)]


@dataclass(frozen=True)
class Mechanism:
    kind: str
    """``cgroup-v1``, ``cgroup-v2`` or ``taskset``."""
    root: Optional[Path] = None
    """Where the workers' cgroups are created (cgroups only)."""
    note: str = ""
    """Why a fallback was taken."""

    def describe(self) -> str:
        where = f" at {self.root}" if self.root else ""
        return f"{self.kind}{where}" + (f" ({self.note})" if self.note else "")


def _writable_dir(root: Path) -> Optional[str]:
    """None when a child cgroup can be made and removed under ``root``; else why not."""
    probe = root / f"tokenlake-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except FileExistsError:
        pass
    except OSError as e:
        return f"cannot create a cgroup under {root}: {e.strerror or e}"
    try:
        probe.rmdir()
    except OSError:
        pass
    return None


def _v2_root(mounts: Path) -> Optional[Path]:
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            root = Path(parts[1])
            try:
                if "cpu" in (root / "cgroup.controllers").read_text().split():
                    return root
            except OSError:
                continue
    return None


def detect(v1_root: Path = CGROUP_V1_CPU, mounts: Path = MOUNTS,
           taskset: Optional[str] = None) -> Mechanism:
    """The best mechanism this host allows (see the module docstring)."""
    notes = []
    if (v1_root / "cpu.cfs_quota_us").exists():
        why = _writable_dir(v1_root)
        if why is None:
            return Mechanism("cgroup-v1", v1_root)
        notes.append(why)
    else:
        notes.append(f"no cgroup v1 cpu controller at {v1_root}")
    v2 = _v2_root(mounts)
    if v2 is not None:
        why = _writable_dir(v2)
        if why is None:
            try:
                if "cpu" not in (v2 / "cgroup.subtree_control").read_text().split():
                    (v2 / "cgroup.subtree_control").write_text("+cpu\n")
                return Mechanism("cgroup-v2", v2)
            except OSError as e:
                notes.append(f"cannot enable the cpu controller in {v2}: {e.strerror or e}")
        else:
            notes.append(why)
    else:
        notes.append("no cgroup v2 hierarchy with the cpu controller")
    ts = taskset if taskset is not None else shutil.which("taskset")
    if ts:
        return Mechanism("taskset", None, "; ".join(notes))
    raise CpuQuotaError("--cpu-quota: no writable cgroup and no taskset on this host: "
                        + "; ".join(notes))


class CpuBudget:
    """One worker's CPU budget: a cgroup with a CPU quota (or, as a fallback, a CPU set)."""

    def __init__(self, mech: Mechanism, name: str, cores: float, index: int = 0,
                 allowed_cpus: Optional[Sequence[int]] = None) -> None:
        quota_us(cores)  # validates
        self.mech = mech
        self.name = name
        self.cores = float(cores)
        self.cpus: list[int] = []
        if mech.kind == "taskset":
            allowed = allowed_cpus if allowed_cpus is not None else sorted(os.sched_getaffinity(0))
            self.cpus = taskset_cpus(index, cores, allowed)
        self.path: Optional[Path] = (mech.root / name) if mech.root is not None else None
        self.created = False
        self.proc = PROC

    def __repr__(self) -> str:
        return f"CpuBudget({self.name!r}, {self.cores:g} cores, {self.mech.kind})"

    def create(self, limit: bool = True) -> CpuBudget:
        """Make the cgroup and set its quota, or (``limit=False``) leave it unlimited until
        ``apply()``. Nothing to make for taskset (the affinity holds from the start)."""
        if self.path is None:
            return self
        try:
            self.path.mkdir(exist_ok=True)
            self.created = True
        except OSError as e:
            raise CpuQuotaError(f"cannot create cgroup {self.path}: {e}") from e
        return self.apply() if limit else self._write(None)

    def apply(self) -> CpuBudget:
        """Set the quota (the cgroup's processes are held to it from now on)."""
        return self._write(self.cores) if self.path is not None else self

    def _write(self, cores: Optional[float]) -> CpuBudget:
        assert self.path is not None
        try:
            if self.mech.kind == "cgroup-v1":
                (self.path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
                q = quota_us(cores) if cores is not None else -1
                (self.path / "cpu.cfs_quota_us").write_text(f"{q}\n")
            else:
                line = cpu_max(cores) if cores is not None else f"max {PERIOD_US}"
                (self.path / "cpu.max").write_text(line + "\n")
        except OSError as e:
            raise CpuQuotaError(f"cannot set the CPU quota of {self.path}: {e}") from e
        return self

    def launcher(self) -> list[str]:
        """The argv prefix that starts a command inside this budget."""
        if self.path is not None:
            return ["sh", "-c", JOIN_AND_EXEC, str(self.path / "cgroup.procs")]
        return ["taskset", "-c", ",".join(map(str, self.cpus))]

    def env(self) -> dict[str, str]:
        """Thread counts matching the budget (torch's intra-op pool follows OMP_NUM_THREADS)."""
        n = str(threads_for(self.cores))
        return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}

    def record(self) -> dict[str, object]:
        """What bench.json keeps about this budget."""
        d: dict[str, object] = {"name": self.name, "cores": self.cores,
                                "mechanism": self.mech.kind, "threads": threads_for(self.cores)}
        if self.path is not None:
            d["quota_us"], d["period_us"] = quota_us(self.cores), PERIOD_US
        else:
            d["cpus"] = list(self.cpus)
        return d

    def pids(self) -> list[int]:
        if self.path is None:
            return []
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def stats(self) -> dict[str, int]:
        """The cgroup's ``cpu.stat`` counters (periods throttled, time throttled, usage) and
        the CPU time of its processes (``cpu_times``)."""
        if self.path is None:
            return {}
        out = {}
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                k, _, v = line.partition(" ")
                if v.strip().isdigit():
                    out[k] = int(v)
        except OSError:
            pass
        out.update(cpu_times(self.pids(), self.proc))
        return out

    def remove(self, timeout: float = 10.0) -> None:
        """Remove the cgroup once its processes are gone. The harness stops the worker first;
        a process still inside after ``timeout / 2`` was started by that worker and is killed."""
        if self.path is None or not self.created:
            return
        deadline = time.monotonic() + timeout
        killed = False
        while True:
            pids = self.pids()
            if not pids:
                try:
                    self.path.rmdir()
                    self.created = False
                    return
                except FileNotFoundError:
                    self.created = False
                    return
                except OSError:
                    pass  # the last exits are still being accounted
            elif not killed and time.monotonic() > deadline - timeout / 2:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                killed = True
            if time.monotonic() > deadline:
                warnings.warn(f"could not remove cgroup {self.path} (processes {pids})",
                              stacklevel=2)
                return
            time.sleep(0.1)

    stop = remove  # the harness's clean-up list calls stop()


def _ticks(stat: str) -> int:
    """utime + stime of a ``/proc/.../stat`` line, in clock ticks."""
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def cpu_times(pids: Sequence[int], proc: Path = PROC,
              thread_prefix: str = POOL_THREAD_PREFIX) -> dict[str, int]:
    """CPU time (user + system, microseconds) of these processes: ``cpu_usec`` in all (every
    thread, ended ones included) and ``pool_threads_usec`` in their live threads whose kernel
    name starts with ``thread_prefix`` (the pool's threads name themselves so:
    ``transport/threads.py``). A process that is gone counts nothing; the kernel's clock tick
    (usually 10 ms) is the resolution."""
    usec = 1_000_000 // os.sysconf("SC_CLK_TCK")
    total = pool = 0
    for pid in pids:
        try:
            total += _ticks((proc / str(pid) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        try:
            tids = list((proc / str(pid) / "task").iterdir())
        except OSError:
            continue
        for t in tids:
            try:
                if (t / "comm").read_text().startswith(thread_prefix):
                    pool += _ticks((t / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
    return {"cpu_usec": total * usec, "pool_threads_usec": pool * usec}


def budgets(mech: Mechanism, cores: float, names: Sequence[str]) -> list[CpuBudget]:
    """One (not yet created) budget per worker name, in order."""
    return [CpuBudget(mech, n, cores, index=i) for i, n in enumerate(names)]
