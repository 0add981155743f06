"""Helpers for tests that talk to real SGLang servers."""

from __future__ import annotations

import random
import time
from typing import Any, Optional

import requests

from sglang_tokenlake.cli import fetch_status

# Servers started by tests fail loudly on any slot leak SGLang itself can see.
STRICT_ENV = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
}


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
    deadline = time.monotonic() + timeout
    st: Optional[dict] = None
    while time.monotonic() < deadline:
        st = fetch_status(broker_addr, timeout=10)
        if st["memory"]["held_by_requests"] == 0 and st["memory"]["locked"] == 0:
            return st
        time.sleep(0.5)
    raise AssertionError(f"worker never went idle: {st}")


def assert_memory_invariant(st: dict) -> None:
    m = st["memory"]
    assert m["free"] + m["cached"] + m["held_by_requests"] == m["capacity"], m
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
