"""Helpers for tests that talk to real SGLang servers."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Optional

import requests

from sglang_tokenlake.cli import fetch_status
from sglang_tokenlake.cluster import (
    PoolSpec,
    Worker,
    WorkerSpec,
    free_port,
    start_workers,
    stop_workers,
    wait_pool,
    wait_until,
)

# Servers started by tests fail loudly on any slot leak SGLang itself can see: the
# idle check, and after every scheduler iteration with a batch the busy check
# (available + evictable + protected + the live requests' own slots == capacity),
# followed by the KV page check (no live row references a free page; no page is
# freed twice), which SGLang runs only as part of the busy check.
STRICT_ENV = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
}


class Pool(NamedTuple):
    workers: list[Worker]
    """The TokenLake workers, joined in one pool."""
    stock: Optional[Worker]
    """A stock ``radix`` worker with the same page size (outputs to compare with), if asked."""
    spec: PoolSpec


@contextmanager
def running_pool(model: str, log_dir: str, n: int, *, pool_args: Sequence[str] = (),
                 page_size: int = 16, segment_size: int = 32, max_total_tokens: int = 16384,
                 stock: bool = False, curve_dir: Optional[str] = None) -> Iterator[Pool]:
    """``n`` TokenLake workers (``--tokenlake-peers`` + ``pool_args``, strict memory checks;
    with ``curve_dir``, a CURVE key per worker made there) and optionally a stock worker;
    yields once every worker sees all ``n`` members alive. Stops them all on the way out,
    frozen ones too."""
    spec = PoolSpec.pick(n)
    specs = spec.worker_specs(model, extra_args=pool_args, curve_dir=curve_dir,
                              page_size=page_size, segment_size=segment_size,
                              max_total_tokens=max_total_tokens, env=STRICT_ENV)
    if stock:
        specs.append(WorkerSpec(model, free_port(avoid=spec.ports), "radix", page_size=page_size,
                                max_total_tokens=max_total_tokens, env=STRICT_ENV))
    workers = start_workers(specs, log_dir)
    try:
        wait_pool(workers[:n], timeout=60, curve_dir=curve_dir)
        yield Pool(workers[:n], workers[n] if stock else None, spec)
    finally:
        stop_workers(workers)


def generate(url: str, input_ids: list[int], max_new_tokens: int = 16,
             timeout: float = 300, **fields: Any) -> dict:
    """Greedy /generate; ``fields`` go to the request body (e.g. cache_salt)."""
    body = {
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                            "ignore_eos": True},
        **fields,
    }
    r = requests.post(url + "/generate", json=body, timeout=timeout)
    r.raise_for_status()
    return r.json()


def generate_text(url: str, text: str, max_new_tokens: int = 16, **extra: Any) -> dict:
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                              "ignore_eos": True}, **extra}
    r = requests.post(url + "/generate", json=body, timeout=300)
    r.raise_for_status()
    return r.json()


def random_tokens(rng: random.Random, n: int, vocab: int = 1024) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def wait_idle_status(broker_addr: str, timeout: float = 30.0) -> dict:
    """The worker's status once no request holds slots (the invariant's moment)."""
    last: list[dict] = []

    def idle() -> Optional[dict]:
        st = fetch_status(broker_addr, timeout=10)
        last[:] = [st]
        m = st["memory"]
        return st if m["held_by_requests"] == 0 and m["locked"] == 0 else None

    return wait_until(idle, timeout, lambda: f"{broker_addr} to go idle: {last}", interval=0.5)


def assert_memory_invariant(st: dict) -> None:
    """free + cached + held_by_requests == capacity, from three independent counts: the
    allocator's free list, the tree's slots and the slots the live requests' rows hold
    outside the tree (``held_derived`` is capacity - free - cached)."""
    m = st["memory"]
    assert m["free"] + m["cached"] + m["held_by_requests"] == m["capacity"], m
    assert m["held_derived"] == m["held_by_requests"] and m["unaccounted"] == 0, m
    assert m["cached"] == m["locked"] + m["evictable"], m


def hf_greedy(model_path: str, input_ids: list[int], n: int) -> list[int]:
    """Greedy continuation by transformers (float32, full recompute each step)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = _hf_model(model_path)
    ids = torch.tensor([input_ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    del AutoModelForCausalLM
    return out


_HF: dict[str, Any] = {}


def _hf_model(path: str):
    if path not in _HF:
        import torch
        from transformers import AutoModelForCausalLM

        _HF[path] = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return _HF[path]
