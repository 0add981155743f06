"""A small HTTP front end for the harness: round-robin or least-load over SGLang workers.

    python -m sglang_tokenlake.bench.proxy --port 30000 --policy least_load \\
        --worker-urls http://127.0.0.1:20001 http://127.0.0.1:20002

``round_robin`` sends request ``i`` to worker ``i mod N``. ``least_load`` sends each
request to the worker with the fewest requests in flight *through this proxy*
(ties: lowest index after the last pick), the queue-length signal a load balancer
has without asking the workers. Responses (including SSE streams) are relayed
chunk by chunk. ``GET /bench_stats`` returns the requests sent to each worker;
``GET /health`` answers 200 when the proxy is up.

TokenLake workers need no cache affinity, so this is their whole front end; stock
SGLang can use it for round-robin too (the cache-aware baseline is the real
sglang-router).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

POLICIES = ("round_robin", "least_load")


class Balancer:
    """Picks a worker per request and keeps the in-flight and total counts."""

    def __init__(self, n: int, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if n <= 0:
            raise ValueError("need at least one worker")
        self.policy = policy
        self.inflight = [0] * n
        self.sent = [0] * n
        self._next = 0

    def pick(self) -> int:
        n = len(self.inflight)
        if self.policy == "round_robin":
            i = self._next % n
        else:
            order = [(self._next + k) % n for k in range(n)]
            i = min(order, key=lambda j: self.inflight[j])
        self._next = (i + 1) % n
        self.inflight[i] += 1
        self.sent[i] += 1
        return i

    def release(self, i: int) -> None:
        self.inflight[i] -= 1


def make_app(worker_urls: list[str], policy: str):  # -> aiohttp.web.Application
    import aiohttp
    from aiohttp import web

    bal = Balancer(len(worker_urls), policy)
    state: dict[str, Optional[aiohttp.ClientSession]] = {"session": None}

    async def on_startup(app: web.Application) -> None:
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def on_cleanup(app: web.Application) -> None:
        if state["session"] is not None:
            await state["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        payload = await request.read()
        i = bal.pick()
        session = state["session"]
        assert session is not None
        try:
            async with session.post(worker_urls[i] + request.path, data=payload,
                                    headers={"Content-Type": "application/json"}) as up:
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
                                  "sent": bal.sent, "inflight": bal.inflight})

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
    a = p.parse_args(argv)
    from aiohttp import web

    web.run_app(make_app([u.rstrip("/") for u in a.worker_urls], a.policy), host=a.host,
                port=a.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
