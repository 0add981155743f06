"""Replay a workload against one HTTP front end with streaming ``/generate`` requests.

Each request is sent at its scheduled time (open loop; follow-up turns wait for
their parent's answer plus a think time), greedy, ``ignore_eos``, with
``"stream": true``; every SSE ``data:`` line carries the cumulative ``output_ids``,
so the arrival time of each token is known: TTFT = first token - send, TBT =
gaps between later tokens, E2E = last token - send.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from sglang_tokenlake.bench.workloads import BenchRequest, full_prompt


@dataclass
class RequestRecord:
    rid: str
    group: str
    sent_s: float = 0.0
    """Send time, seconds from the start of the replay."""
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    tbt_s: list[float] = field(default_factory=list)
    """Gaps between consecutive output tokens after the first."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    error: str = ""
    server_rid: str = ""
    """The id SGLang gave the request (``meta_info["id"]``)."""
    worker: Optional[int] = None
    """TokenLake configurations: the worker that ran it (its index in the run's worker list)
    and, of ``cached_tokens``, those pulled from and shipped to other workers, from the
    workers' ``--tokenlake-request-log``; None where no worker logged it."""
    pulled_tokens: Optional[int] = None
    shipped_tokens: Optional[int] = None

    @property
    def ok(self) -> bool:
        return not self.error

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tbt_s"] = [round(x, 6) for x in self.tbt_s]
        return d


def body(input_ids: Sequence[int], max_new_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "input_ids": list(input_ids),
        "sampling_params": {"temperature": 0, "max_new_tokens": int(max_new_tokens),
                            "ignore_eos": True},
        "stream": stream,
    }


async def stream_generate(session: Any, url: str, input_ids: Sequence[int], max_new_tokens: int,
                          rec: RequestRecord, t_zero: float, timeout: float) -> None:
    """One streaming request; fills ``rec`` (times relative to ``t_zero``) or sets ``rec.error``."""
    import aiohttp

    rec.prompt_tokens = len(input_ids)
    t_send = time.perf_counter()
    rec.sent_s = t_send - t_zero
    last_t, last_n, meta = t_send, 0, {}
    try:
        async with session.post(url + "/generate", json=body(input_ids, max_new_tokens),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    d = json.loads(payload)
                    if "error" in d:
                        rec.error = f"server error: {str(d['error'])[:300]}"
                        return
                    now = time.perf_counter()
                    ids = d.get("output_ids") or []
                    if len(ids) > last_n:
                        if last_n == 0:
                            rec.ttft_s = now - t_send
                        else:
                            gap = now - last_t
                            # Several tokens in one chunk: spread the gap evenly.
                            k = len(ids) - last_n
                            rec.tbt_s += [gap / k] * k
                        last_t, last_n = now, len(ids)
                        rec.output_ids = list(ids)
                    meta = d.get("meta_info") or meta
    except asyncio.CancelledError:
        raise
    except Exception as e:  # network errors, timeouts, bad JSON: recorded, not raised
        rec.error = f"{type(e).__name__}: {e}"[:300]
        return
    rec.e2e_s = last_t - t_send
    rec.output_tokens = len(rec.output_ids)
    rec.cached_tokens = int(meta.get("cached_tokens", 0) or 0)
    rec.server_rid = str(meta.get("id") or "")
    if rec.output_tokens != max_new_tokens:
        rec.error = f"got {rec.output_tokens} output tokens, asked for {max_new_tokens}"


async def replay(url: str, requests: Sequence[BenchRequest], timeout: float = 600.0,
                 on_done: Optional[Callable[[RequestRecord], None]] = None,
                 abort: Optional[Callable[[], Optional[str]]] = None) -> list[RequestRecord]:
    """Send every request at its time; return one record per request, in workload order.

    ``abort`` (cheap, polled twice a second) returns a reason to give up, e.g. a
    worker that died: the replay is cancelled and ``RuntimeError(reason)`` raised.
    """
    import aiohttp

    records = {r.rid: RequestRecord(r.rid, r.group) for r in requests}
    finished: dict[str, asyncio.Event] = {r.rid: asyncio.Event() for r in requests}
    done: dict[str, tuple[Sequence[int], Sequence[int]]] = {}

    async def one(req: BenchRequest, session: aiohttp.ClientSession, t_zero: float) -> None:
        rec = records[req.rid]
        try:
            delay = req.arrival_s - (time.perf_counter() - t_zero)
            if delay > 0:
                await asyncio.sleep(delay)
            if req.parent is not None:
                await finished[req.parent].wait()
                if not records[req.parent].ok:
                    rec.error = f"parent {req.parent} failed"
                    return
                await asyncio.sleep(req.think_s)
            ids = full_prompt(req, done)
            await stream_generate(session, url, ids, req.max_new_tokens, rec, t_zero, timeout)
            if rec.ok:
                done[req.rid] = (ids, rec.output_ids)
        finally:
            finished[req.rid].set()
            if on_done is not None:
                on_done(rec)

    async def watch(main: asyncio.Future) -> None:
        while abort is not None and not main.done():
            reason = abort()
            if reason:
                main.cancel()
                raise RuntimeError(reason)
            await asyncio.sleep(0.5)

    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        t_zero = time.perf_counter()
        main = asyncio.gather(*(one(r, session, t_zero) for r in requests))
        watcher = asyncio.ensure_future(watch(main))
        try:
            await main
        except asyncio.CancelledError:
            if watcher.done() and watcher.exception() is not None:
                raise watcher.exception() from None
            raise
        finally:
            watcher.cancel()
    return [records[r.rid] for r in requests]


def run_replay(url: str, requests: Sequence[BenchRequest], timeout: float = 600.0,
               on_done: Optional[Callable[[RequestRecord], None]] = None,
               abort: Optional[Callable[[], Optional[str]]] = None) -> list[RequestRecord]:
    return asyncio.run(replay(url, requests, timeout, on_done, abort))


def run_one(url: str, input_ids: Sequence[int], max_new_tokens: int,
            timeout: float = 600.0) -> RequestRecord:
    """A single streaming request (calibration, warm-up)."""
    import aiohttp

    async def go() -> RequestRecord:
        rec = RequestRecord("one", "")
        async with aiohttp.ClientSession() as s:
            await stream_generate(s, url, input_ids, max_new_tokens, rec, time.perf_counter(),
                                  timeout)
        return rec

    return asyncio.run(go())
