"""Front ends of the configurations: the real sglang-router (PyPI) or the harness's proxy.

Every configuration that a router policy can express runs behind sglang-router
0.3.2 itself: ``round_robin`` (stock and TokenLake), ``cache_aware`` (stock) and
``power_of_two`` (TokenLake: two random workers, the less loaded one, where load
is the router's own count of requests in flight to each worker: its load monitor
gets nothing from SGLang 0.5.23 workers and logs "No loads fetched from workers").
The harness's aiohttp proxy remains for two policies the router does not have:
``least_load``, the fewest requests in flight over *all* workers (its load-based
policy compares two random workers), and ``bounded_load``, each prefix kept on its
homes with every worker's load bounded (``bench.proxy``).
``--rr-frontend proxy`` puts round-robin behind the proxy too, as older runs did.

Both run as their own process (own process group, log file), are ready once a
tiny ``/generate`` goes through (the router answers 503 ``no_available_workers``
for a few seconds after it starts), and are stopped by signalling the group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import requests

from sglang_tokenlake.cluster import free_port

# kind -> (implementation, policy)
FRONTENDS = {
    "proxy-round_robin": ("proxy", "round_robin"),
    "proxy-least_load": ("proxy", "least_load"),
    "proxy-bounded_load": ("proxy", "bounded_load"),
    "router-round_robin": ("router", "round_robin"),
    "router-cache_aware": ("router", "cache_aware"),
    "router-power_of_two": ("router", "power_of_two"),
}


class Frontend:
    """One front-end process in its own process group."""

    def __init__(self, kind: str, worker_urls: Sequence[str], log_dir: str | Path,
                 extra_args: Sequence[str] = (), avoid_ports: Sequence[int] = ()) -> None:
        if kind not in FRONTENDS:
            raise ValueError(f"unknown front end {kind!r}; choose from {sorted(FRONTENDS)}")
        self.kind = kind
        self.impl, self.policy = FRONTENDS[kind]
        self.worker_urls = list(worker_urls)
        self.port = free_port(avoid=avoid_ports)
        self.log_path = Path(log_dir) / f"frontend-{kind}-{self.port}.log"
        self.extra_args = list(extra_args)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        if self.impl == "proxy":
            return [sys.executable, "-m", "sglang_tokenlake.bench.proxy", "--host", "127.0.0.1",
                    "--port", str(self.port), "--policy", self.policy,
                    "--worker-urls", *self.worker_urls, *self.extra_args]
        return [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                "--port", str(self.port), "--policy", self.policy,
                "--worker-urls", *self.worker_urls, "--log-level", "warn", *self.extra_args]

    def start(self, timeout: float = 120.0) -> Frontend:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"front end {self.kind} exited with code "
                                   f"{self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                r = requests.post(self.url + "/generate", timeout=30, json={
                    "input_ids": [5, 6, 7],
                    "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except requests.RequestException as e:
                last = f"{type(e).__name__}"
            time.sleep(0.5)
        raise TimeoutError(f"front end {self.kind} not serving after {timeout}s ({last}); "
                           f"log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stats(self) -> Optional[dict]:
        """Per-worker request counts (the proxy only; the router does not expose them)."""
        if self.impl != "proxy":
            return None
        try:
            return requests.get(self.url + "/bench_stats", timeout=5).json()
        except requests.RequestException:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    continue
        try:  # leftovers of the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
