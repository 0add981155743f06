"""Start and stop SGLang workers (``python -m sglang.launch_server``) from Python or the shell.

    python -m sglang_tokenlake.cluster --model models/tiny --workers 2 --cache-backend tokenlake

starts the workers, prints their URLs and broker addresses, and stops every
process it started on Ctrl-C. Tests, the demo and the benchmarks use the same
``Worker`` class, ``PoolSpec`` (ports and ``--tokenlake-peers`` of a pool) and
``wait_pool``. On a host without CUDA the CPU flags are added
(``--device cpu --attention-backend torch_native_extend ...``, see DESIGN notes
and sglang/cpu_attention.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from sglang_tokenlake.config import BROKER_PORT_OFFSET

T = TypeVar("T")

CPU_FLAGS = [
    "--device", "cpu",
    "--attention-backend", "torch_native_extend",  # sglang/cpu_attention.py
    "--sampling-backend", "pytorch",
    "--cuda-graph-backend-decode", "disabled",
    "--cuda-graph-backend-prefill", "disabled",
    "--disable-overlap-schedule",
    # Only a ceiling: --max-total-tokens sizes the pool. A small fraction fails
    # SGLang's memory profiling when several workers start at once on one host.
    "--mem-fraction-static", "0.3",
]

CPU_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    # One thread per worker: several workers share a few cores.
    "OMP_NUM_THREADS": "1",
}


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(avoid: Sequence[int] = (), start: int = 10000, end: int = 20000) -> int:
    """A port p such that p and p + BROKER_PORT_OFFSET are free (the broker's default).

    Below 21000: SGLang picks its own internal ports (nccl_port) at random in
    22000-29999 while workers start, and may take a port handed out here but not
    yet bound; the kernel's ephemeral ports start at 32768.

    ``avoid`` holds HTTP ports already handed out: neither p nor its broker port
    may collide with them or with their (not yet bound) broker ports.
    """
    import random

    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    taken = set(avoid) | {a + BROKER_PORT_OFFSET for a in avoid}
    for _ in range(2000):
        p = rng.randrange(start, end)
        if p in taken or p + BROKER_PORT_OFFSET in taken:
            continue
        if port_is_free(p) and port_is_free(p + BROKER_PORT_OFFSET):
            return p
    raise RuntimeError("no free port pair found")


@dataclass(frozen=True)
class PoolSpec:
    """The HTTP ports of a pool's workers and the ``--tokenlake-peers`` they share.

    ::

        ports          20417            23051            26980          (HTTP, --port)
        broker_addrs   127.0.0.1:21417  127.0.0.1:24051  127.0.0.1:27980  (+ BROKER_PORT_OFFSET)
        peers          "127.0.0.1:21417,127.0.0.1:24051,127.0.0.1:27980"
    """

    ports: tuple[int, ...]
    host: str = "127.0.0.1"

    @classmethod
    def pick(cls, n: int, host: str = "127.0.0.1", avoid: Sequence[int] = (),
             base_port: int = 0) -> PoolSpec:
        """``n`` workers on free ports (or ``base_port``, ``base_port + 1``, ... when given)."""
        if base_port:
            return cls(tuple(base_port + i for i in range(n)), host)
        ports: list[int] = []
        for _ in range(n):
            ports.append(free_port(avoid=[*avoid, *ports]))
        return cls(tuple(ports), host)

    @property
    def broker_addrs(self) -> list[str]:
        return [f"{self.host}:{p + BROKER_PORT_OFFSET}" for p in self.ports]

    @property
    def peers(self) -> str:
        return ",".join(self.broker_addrs)

    def peer_args(self) -> list[str]:
        """``--tokenlake-peers`` for each worker; none for a pool of one."""
        return ["--tokenlake-peers", self.peers] if len(self.ports) > 1 else []

    def make_keys(self, directory: str) -> list[str]:
        """CURVE keys of this pool in ``directory`` (kept if there): one pair per worker
        (``w<i>``, naming its broker address) and a status-only ``ops`` pair. Names."""
        from sglang_tokenlake.transport.auth import keygen

        names = [f"w{i}" for i in range(len(self.ports))]
        for name, member in [*zip(names, self.broker_addrs), ("ops", None)]:
            if not os.path.exists(os.path.join(directory, f"{name}.key_secret")):
                keygen(directory, name, member)
        return names

    def worker_specs(self, model: str, *, extra_args: Sequence[str] = (),
                     curve_dir: Optional[str] = None, **fields: Any) -> list[WorkerSpec]:
        """One TokenLake ``WorkerSpec`` per port: ``--tokenlake-peers`` + ``extra_args``
        (+ with ``curve_dir``, its own CURVE key: ``make_keys``); ``fields`` are the other
        ``WorkerSpec`` fields (page_size, segment_size, env, ...)."""
        fields.setdefault("cache_backend", "tokenlake")
        args = [*self.peer_args(), *extra_args]
        keys: list[list[str]] = [[] for _ in self.ports]
        if curve_dir:
            keys = [["--tokenlake-curve-dir", curve_dir, "--tokenlake-curve-key", name]
                    for name in self.make_keys(curve_dir)]
        return [WorkerSpec(model, p, extra_args=[*args, *k], **fields)
                for p, k in zip(self.ports, keys)]


def wait_until(pred: Callable[[], T], timeout: float, what: Union[str, Callable[[], str]],
               interval: float = 0.25) -> T:
    """Poll ``pred`` until it returns something truthy, and return that.

    On timeout raise ``TimeoutError`` naming ``what`` (a callable is asked then, so
    the message can show the last state seen).
    """
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            desc = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {desc}")
        time.sleep(interval)


def wait_pool(workers: Sequence[Worker], timeout: float = 60.0,
              curve_dir: Optional[str] = None) -> list[dict[str, Any]]:
    """Until every worker's ``tokenlake status`` lists exactly ``workers`` as live
    members; their statuses. A broker that does not answer yet counts as not formed."""
    from sglang_tokenlake.cli import fetch_status

    want = sorted(w.broker_addr for w in workers)
    seen: dict[str, Any] = {}

    def formed() -> Optional[list[dict[str, Any]]]:
        sts = []
        for w in workers:
            try:
                st = fetch_status(w.broker_addr, timeout=10, curve_dir=curve_dir)
            except Exception as e:  # busy or still starting: ask again
                seen[w.broker_addr] = repr(e)
                return None
            alive = sorted(m["id"] for m in (st.get("pool") or {}).get("members", [])
                           if m["alive"])
            seen[w.broker_addr] = alive
            sts.append(st)
        return sts if all(seen[w.broker_addr] == want for w in workers) else None

    return wait_until(formed, timeout, lambda: f"the pool {want} to form; live members seen: "
                      f"{seen}", interval=0.5)


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


@dataclass
class WorkerSpec:
    model: str
    port: int
    cache_backend: str = "tokenlake"
    page_size: int = 1
    segment_size: Optional[int] = None
    max_total_tokens: Optional[int] = 8192
    dtype: str = "float32"
    device: Optional[str] = None  # None: cpu when CUDA is missing
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # SGLang's torch.distributed rendezvous port; None: SGLang draws one at random in
    # 22000-29999, and two workers starting together can draw the same one.
    nccl_port: Optional[int] = None

    def argv(self) -> list[str]:
        a = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", self.model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--page-size", str(self.page_size),
            "--cache-backend", self.cache_backend,
            "--sleep-on-idle",
            "--log-level", "info",
        ]
        if self.max_total_tokens:
            a += ["--max-total-tokens", str(self.max_total_tokens)]
        if self.cache_backend == "tokenlake" and self.segment_size:
            a += ["--tokenlake-segment-size", str(self.segment_size)]
        if self.nccl_port:
            a += ["--nccl-port", str(self.nccl_port)]
        device = self.device or ("cuda" if cuda_available() else "cpu")
        if device == "cpu":
            a += CPU_FLAGS
        return a + list(self.extra_args)


class Worker:
    """One ``launch_server`` process (in its own process group)."""

    def __init__(self, spec: WorkerSpec, log_dir: Optional[str] = None, name: str = "") -> None:
        self.spec = spec
        self.name = name or f"worker-{spec.port}"
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tokenlake-logs-"))
        self.log_path = self.log_dir / f"{self.name}.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    @property
    def broker_addr(self) -> str:
        return f"127.0.0.1:{self.spec.port + BROKER_PORT_OFFSET}"

    def start(self) -> Worker:
        env = dict(os.environ)
        if (self.spec.device or ("cuda" if cuda_available() else "cpu")) == "cpu":
            env.update(CPU_ENV)
        env.update(self.spec.env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.spec.argv(), stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}"
                )
            try:
                r = requests.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout}s; log tail:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the server and its scheduler processes)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        self.kill(signal.SIGTERM)
        self.kill(signal.SIGCONT)  # a test may have frozen it (SIGSTOP)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait(10)
        # Scheduler children may outlive the parent briefly; clear the group.
        self.kill(signal.SIGKILL)


def with_nccl_ports(specs: Sequence[WorkerSpec]) -> list[WorkerSpec]:
    """``specs`` with a distinct free ``nccl_port`` for each that has none (here or in
    its ``extra_args``), clear of every HTTP and broker port of the batch."""
    taken = [s.port for s in specs] + [s.nccl_port for s in specs if s.nccl_port]
    out = []
    for s in specs:
        if not s.nccl_port and "--nccl-port" not in s.extra_args:
            s = replace(s, nccl_port=free_port(avoid=taken))
            taken.append(s.nccl_port)
        out.append(s)
    return out


def start_workers(specs: Sequence[WorkerSpec], log_dir: Optional[str] = None,
                  timeout: float = 300.0) -> list[Worker]:
    """Start all workers at once, wait for all; on any failure stop them all.

    Each gets its own ``--nccl-port`` (``with_nccl_ports``): left to SGLang, workers
    starting together draw theirs independently and may collide (EADDRINUSE).
    """
    specs = with_nccl_ports(specs)
    workers = [Worker(s, log_dir, name=f"worker{i}-{s.port}") for i, s in enumerate(specs)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(timeout)
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


def stop_workers(workers: Sequence[Worker]) -> None:
    for w in workers:
        w.stop()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_tokenlake.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model path (e.g. models/tiny)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--base-port", type=int, default=0, help="first HTTP port (0: pick free ports)")
    p.add_argument("--cache-backend", choices=["radix", "tokenlake"], default="tokenlake")
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--segment-size", type=int, default=None)
    p.add_argument("--max-total-tokens", type=int, default=8192)
    p.add_argument("--log-dir", default="out/logs")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more launch_server flags after --")
    a = p.parse_args(argv)
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    pool = PoolSpec.pick(a.workers, base_port=a.base_port)
    specs = [
        WorkerSpec(a.model, port, a.cache_backend, a.page_size, a.segment_size,
                   a.max_total_tokens, extra_args=list(extra))
        for port in pool.ports
    ]
    workers = start_workers(specs, a.log_dir)
    for w in workers:
        print(f"{w.name}: {w.url}  broker {w.broker_addr}  log {w.log_path}", flush=True)
    print("Ctrl-C stops all workers.", flush=True)
    try:
        while all(w.alive() for w in workers):
            time.sleep(1)
        print("a worker exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_workers(workers)


if __name__ == "__main__":
    sys.exit(main())
