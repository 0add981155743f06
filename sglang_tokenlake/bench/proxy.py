"""A small HTTP front end for the harness: round-robin, least-load or bounded-load prefix
homes over SGLang workers.

    python -m sglang_tokenlake.bench.proxy --port 30000 --policy least_load \\
        --worker-urls http://127.0.0.1:20001 http://127.0.0.1:20002

``round_robin`` sends request ``i`` to worker ``i mod N``. ``least_load`` sends each
request to the worker with the fewest requests in flight *through this proxy*, the
queue-length signal a load balancer has without asking the workers. Ties go to the
worker that last served a prompt with the same first ``AFFINITY_TOKENS`` tokens (it
likely keeps that prefix: TokenLake keeps what a worker computed there, so it is
served without a transfer), else to the lowest index after the last pick. A busier
worker never wins by affinity: load comes first.

``bounded_load`` keeps each prefix (the same first ``AFFINITY_TOKENS`` tokens) on its
*homes*, workers in the order the prefix got them, and bounds every worker's load
(consistent hashing with bounded loads, Mirrokni et al., SODA'18): a request goes to the
first of its prefix's homes whose requests in flight, with it, stay within
``ceil(load_factor * (all in flight + 1) / N)``; when none is within, the least loaded
worker becomes the prefix's next home and takes it. A prefix's first home is the least
loaded worker when it is first seen. So a hot prefix overflows to *one* next worker,
which then holds it too (the context is copied once, not to every worker a balancer
happens to pick), and cold prefixes stay where they are cached. The least loaded worker
is always within the bound, so every request is placed. Responses (including SSE streams) are
relayed chunk by chunk. ``GET /bench_stats`` returns the requests sent to each worker;
``GET /health`` answers 200 when the proxy is up.

TokenLake workers need no cache affinity, so this is their whole front end; stock
SGLang can use it for round-robin too (the cache-aware baseline is the real
sglang-router).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

POLICIES = ("round_robin", "least_load", "bounded_load")
LOAD_FACTOR = 3.0
"""``bounded_load``: a worker takes a request of a prefix it homes while its requests in
flight stay within this many times the mean (rounded up). Chosen with the simulator on
longdoc seeds the harness does not run (``scripts/sim_load_factor.py``,
results/bench-longdoc-bounded/): a miss there costs about twenty hits' prefill, and the
literature's 1.25 (requests of equal cost) moves away too many hits."""
AFFINITY_TOKENS = 64
"""Prompt tokens (from the start) that name a prefix (``least_load``'s tie-break,
``bounded_load``'s homes)."""
MAX_AFFINITY = 1 << 16
"""Prefixes remembered at most (the oldest half is forgotten beyond it)."""


def affinity_key(payload: bytes) -> Optional[int]:
    """The prefix a /generate body starts with: a hash of its first ``AFFINITY_TOKENS``
    input ids (or of the first characters of its text); None when it has neither."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    ids, text = body.get("input_ids"), body.get("text")
    if isinstance(ids, list) and ids and not isinstance(ids[0], list):
        return hash(("ids", tuple(ids[:AFFINITY_TOKENS])))
    if isinstance(text, str) and text:
        return hash(("text", text[: AFFINITY_TOKENS * 4]))
    return None


class Balancer:
    """Picks a worker per request and keeps the in-flight and total counts."""

    def __init__(self, n: int, policy: str, load_factor: float = LOAD_FACTOR) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if n <= 0:
            raise ValueError("need at least one worker")
        if not load_factor >= 1.0:  # NaN too
            raise ValueError(f"load_factor must be >= 1, got {load_factor!r}")
        self.policy = policy
        self.load_factor = load_factor
        self.inflight = [0] * n
        self.sent = [0] * n
        self.affine = 0  # least_load picks decided by affinity; bounded_load: by a home
        self.overflows = 0  # bounded_load: prefixes given another home
        self._next = 0
        self._last: dict[int, int] = {}  # prefix -> worker that served it last
        self._homes: dict[int, list[int]] = {}  # bounded_load: prefix -> its homes, in order

    def pick(self, prefix: Optional[int] = None) -> int:
        """The worker for the next request (``prefix``: its ``affinity_key``)."""
        n = len(self.inflight)
        if self.policy == "round_robin":
            i = self._next % n
        elif self.policy == "bounded_load":
            i = self._bounded(prefix)
        else:
            i = self._least()
            if prefix is not None:
                last = self._last.get(prefix)
                if last is not None and last != i and self.inflight[last] == self.inflight[i]:
                    i = last
                    self.affine += 1
                _remember(self._last, prefix, i)
        self._next = (i + 1) % n
        self.inflight[i] += 1
        self.sent[i] += 1
        return i

    def bound(self) -> int:
        """``bounded_load``: the most requests in flight a worker may have with the next one."""
        return math.ceil(self.load_factor * (sum(self.inflight) + 1) / len(self.inflight))

    def _least(self) -> int:
        """The least loaded worker; ties: the first from the one after the last pick."""
        n = len(self.inflight)
        return min(((self._next + k) % n for k in range(n)), key=lambda j: self.inflight[j])

    def _bounded(self, prefix: Optional[int]) -> int:
        if prefix is None:
            return self._least()
        homes = self._homes.pop(prefix, None)
        if homes is not None:
            self._homes[prefix] = homes  # the most recent entry again
        cap = self.bound()
        for h in homes or ():
            if self.inflight[h] + 1 <= cap:
                self.affine += 1
                return h
        # No home within the bound (or a new prefix): the least loaded worker, which is
        # within it (some worker has at most the mean), becomes the next home.
        i = self._least()
        if homes is None:
            _remember(self._homes, prefix, [i])
        elif i not in homes:
            homes.append(i)
            self.overflows += 1
        return i

    def release(self, i: int) -> None:
        self.inflight[i] -= 1


def _remember(table: dict, key: int, value) -> None:
    """``table[key] = value`` as the most recent entry, forgetting the oldest half of the
    table when it holds ``MAX_AFFINITY`` prefixes."""
    if key not in table and len(table) >= MAX_AFFINITY:
        for k in list(table)[: MAX_AFFINITY // 2]:
            del table[k]
    table.pop(key, None)
    table[key] = value


KEEPALIVE_S = 2.0
"""Seconds the proxy keeps an idle connection to a worker open."""


def make_app(worker_urls: list[str], policy: str,
             load_factor: float = LOAD_FACTOR):  # -> aiohttp.web.Application
    import aiohttp
    from aiohttp import web

    bal = Balancer(len(worker_urls), policy, load_factor)
    state: dict[str, Optional[aiohttp.ClientSession]] = {"session": None}

    async def on_startup(app: web.Application) -> None:
        # Idle connections close here before the worker's server closes them (uvicorn:
        # 5 s), so a request is rarely sent on a connection the worker is closing.
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def on_cleanup(app: web.Application) -> None:
        if state["session"] is not None:
            await state["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        payload = await request.read()
        i = bal.pick(affinity_key(payload) if policy != "round_robin" else None)
        session = state["session"]
        assert session is not None
        try:
            def send():  # -> the pending response
                return session.post(worker_urls[i] + request.path, data=payload,
                                    headers={"Content-Type": "application/json"})

            try:
                up = await send()
            except aiohttp.ServerDisconnectedError:
                # The worker closed a reused keep-alive connection before answering (it
                # had not read the request): send it once more, on a new connection.
                up = await send()
            async with up:
                resp = web.StreamResponse(status=up.status, headers={
                    "Content-Type": up.headers.get("Content-Type", "application/json"),
                    "X-Bench-Worker": str(i)})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientError as e:
            return web.json_response({"error": f"worker {i}: {e}"}, status=502)
        finally:
            bal.release(i)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"policy": policy, "workers": worker_urls,
                                  "sent": bal.sent, "inflight": bal.inflight,
                                  "affinity_picks": bal.affine, "overflows": bal.overflows,
                                  "load_factor": bal.load_factor})

    app = web.Application(client_max_size=1 << 30)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/generate", forward)
    app.router.add_get("/health", health)
    app.router.add_get("/bench_stats", stats)
    return app


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_tokenlake.bench.proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--policy", choices=POLICIES, default="round_robin")
    p.add_argument("--worker-urls", nargs="+", required=True)
    p.add_argument("--load-factor", type=float, default=LOAD_FACTOR,
                   help="bounded_load: a worker takes a request while its requests in flight "
                        "stay within this many times the mean, rounded up (>= 1; default "
                        "%(default)s)")
    a = p.parse_args(argv)
    if not a.load_factor >= 1.0:
        p.error(f"--load-factor must be >= 1, got {a.load_factor}")
    from aiohttp import web

    web.run_app(make_app([u.rstrip("/") for u in a.worker_urls], a.policy, a.load_factor),
                host=a.host, port=a.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
