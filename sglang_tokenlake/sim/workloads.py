"""Workloads for the simulator: the Mooncake traces and four generated shapes.

A request is reduced to what the cache policies see: arrival time, prompt and
output lengths, and one chained key per block of the prompt (``keys[i]`` names
the first ``(i+1) * segment_tokens`` tokens, so two requests share a prefix of
``k`` blocks exactly when their first ``k`` keys are equal). Only the first
``input_tokens // segment_tokens`` blocks are full and cacheable; a partial last
block still has a key (the router's text tree matches it) but is never pooled.

Mooncake: ``hash_ids`` already are such chained block ids (512-token blocks) and
are used as the keys. ``mooncake_tokens`` synthesizes token ids per hash id for
token-level code: equal ids give equal tokens, so ``segments.segment_keys`` over
them shares prefixes exactly where the hash ids do.

Generated shapes build each prompt from *pieces* ``(source, length)``: ``length``
tokens from the start of an endless token stream ``source`` (a document, a
session's history, a question). A block's key is ``segments.chain_key`` of the
previous key and the block's content descriptor (the source ranges it covers).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from sglang_tokenlake.segments import chain_key, request_namespace

MOONCAKE_BLOCK = 512


def data_dir() -> Path:
    """Where the Mooncake traces are: ``$TOKENLAKE_MOONCAKE_DIR``, else ``shared/data/mooncake``
    next to (or above) the checkout."""
    env = os.environ.get("TOKENLAKE_MOONCAKE_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for base in (root, root.parent):
        cand = base / "shared" / "data" / "mooncake"
        if cand.is_dir():
            return cand
    return root / "shared" / "data" / "mooncake"


@dataclass(frozen=True)
class Request:
    arrival_s: float
    """Arrival time in seconds from the start of the workload (before rate scaling)."""
    input_tokens: int
    output_tokens: int
    keys: tuple[int, ...]
    """One chained key per prompt block, ``ceil(input_tokens / segment_tokens)`` of them."""


@dataclass
class Workload:
    name: str
    segment_tokens: int
    requests: list[Request] = field(default_factory=list)

    def full_blocks(self, r: Request) -> int:
        """Cacheable (full) blocks of ``r``."""
        return min(r.input_tokens // self.segment_tokens, len(r.keys))

    def unique_full_blocks(self) -> int:
        """Distinct full blocks over the whole workload (the size of an infinite cache)."""
        seen: set[int] = set()
        for r in self.requests:
            seen.update(r.keys[: self.full_blocks(r)])
        return len(seen)

    def duration_s(self) -> float:
        if not self.requests:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    def summary(self) -> dict:
        n = len(self.requests)
        tin = sum(r.input_tokens for r in self.requests)
        full = sum(self.full_blocks(r) for r in self.requests)
        uniq = self.unique_full_blocks()
        return {
            "name": self.name,
            "requests": n,
            "segment_tokens": self.segment_tokens,
            "duration_s": round(self.duration_s(), 3),
            "mean_input_tokens": round(tin / max(n, 1), 1),
            "mean_output_tokens": round(sum(r.output_tokens for r in self.requests) / max(n, 1), 1),
            "unique_full_blocks": uniq,
            # Token hit rate of an infinite cache: every repeated full block hits.
            "infinite_cache_hit_rate": round((full - uniq) * self.segment_tokens / max(tin, 1), 4),
        }


# -- Mooncake ------------------------------------------------------------------


def load_mooncake(path: str | Path, limit: Optional[int] = None) -> Workload:
    """A Mooncake FAST'25 trace (JSONL: timestamp ms, input_length, output_length, hash_ids)."""
    path = Path(path)
    reqs: list[Request] = []
    with path.open() as f:
        for line in f:
            if limit is not None and len(reqs) >= limit:
                break
            d = json.loads(line)
            reqs.append(Request(d["timestamp"] / 1000.0, int(d["input_length"]),
                                max(int(d["output_length"]), 1), tuple(d["hash_ids"])))
    reqs.sort(key=lambda r: r.arrival_s)
    return Workload(f"mooncake-{path.stem.replace('_trace', '')}", MOONCAKE_BLOCK, reqs)


def mooncake_tokens(hash_ids: Sequence[int], input_tokens: int, vocab: int = 32000) -> np.ndarray:
    """Token ids for a Mooncake request: 512 deterministic tokens per hash id, cut to length."""
    blocks = [np.random.default_rng(h).integers(0, vocab, MOONCAKE_BLOCK) for h in hash_ids]
    out = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    return out[:input_tokens].astype(np.int64)


# -- generated shapes ------------------------------------------------------------

_SEED = request_namespace("tokenlake-sim")


def piece_keys(pieces: Sequence[tuple[int, int]], segment_tokens: int) -> tuple[int, ...]:
    """Chained keys of a prompt made of ``(source, length)`` pieces (each from its stream's start)."""
    bounds = []  # (global start, global end, source)
    pos = 0
    for src, n in pieces:
        if n > 0:
            bounds.append((pos, pos + n, src))
            pos += n
    keys: list[int] = []
    parent, j = _SEED, 0
    for b in range(math.ceil(pos / segment_tokens)):
        lo, hi = b * segment_tokens, min((b + 1) * segment_tokens, pos)
        desc: list[int] = []
        while j < len(bounds) and bounds[j][1] <= lo:
            j += 1
        i = j
        while i < len(bounds) and bounds[i][0] < hi:
            s, e, src = bounds[i]
            desc += [src, max(lo, s) - s, min(hi, e) - s]
            i += 1
        parent = chain_key(parent, np.asarray(desc, dtype=np.int64))
        keys.append(parent)
    return tuple(keys)


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - sigma * sigma / 2
    return int(min(hi, max(lo, rng.lognormal(mu, sigma))))


def _zipf_weights(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return w / w.sum()


def _finish(name: str, seg: int, raw: list[tuple[float, list[tuple[int, int]], int]]) -> Workload:
    raw.sort(key=lambda t: t[0])
    reqs = [Request(t, sum(n for _, n in pieces), out, piece_keys(pieces, seg))
            for t, pieces, out in raw]
    return Workload(name, seg, reqs)


def loogle_like(requests: int = 3000, docs: int = 120, doc_tokens: float = 24000,
                zipf_a: float = 1.0, rate: float = 2.0, segment_tokens: int = 256,
                seed: int = 0) -> Workload:
    """Shared long documents, many questions each (LooGLE-like), documents Zipf-popular.

    Prompt = document (lognormal, mean ``doc_tokens``) + a fresh question (20-200
    tokens); outputs are short answers (lognormal mean 120). Poisson arrivals.
    """
    rng = np.random.default_rng(seed)
    lens = [_lognormal(rng, doc_tokens, 0.5, 4000, 96000) for _ in range(docs)]
    pick = rng.choice(docs, size=requests, p=_zipf_weights(docs, zipf_a))
    t, raw = 0.0, []
    for r, d in enumerate(pick):
        t += rng.exponential(1.0 / rate)
        q = int(rng.integers(20, 200))
        raw.append((t, [(1 + int(d), lens[d]), (1_000_000 + r, q)],
                    _lognormal(rng, 120, 0.6, 8, 1024)))
    return _finish("loogle-like", segment_tokens, raw)


def scbench_like(sessions: int = 300, contexts: int = 60, context_tokens: float = 60000,
                 turns: int = 5, rate: float = 0.5, think_s: float = 20.0,
                 segment_tokens: int = 256, seed: int = 0) -> Workload:
    """Multi-turn sessions over long shared contexts with growing history (SCBench-like).

    Each session picks a context (Zipf over ``contexts``), then asks ``turns``
    questions; turn ``t``'s prompt is the context + all earlier questions and answers
    + the new question. Sessions start Poisson(``rate``); turns follow after the
    previous answer plus an exponential think time.
    """
    rng = np.random.default_rng(seed)
    lens = [_lognormal(rng, context_tokens, 0.6, 8000, 200000) for _ in range(contexts)]
    pick = rng.choice(contexts, size=sessions, p=_zipf_weights(contexts, 0.8))
    t0, raw = 0.0, []
    for s, c in enumerate(pick):
        t0 += rng.exponential(1.0 / rate)
        t, hist = t0, 0
        for _ in range(turns):
            q = _lognormal(rng, 150, 0.7, 10, 2000)
            out = _lognormal(rng, 300, 0.7, 10, 2000)
            raw.append((t, [(1 + int(c), lens[c]), (2_000_000 + s, hist + q)], out))
            hist += q + out
            t += 0.03 * out + rng.exponential(think_s)
    return _finish("scbench-like", segment_tokens, raw)


def sharegpt_like(conversations: int = 3000, system_prompts: int = 8, rate: float = 8.0,
                  think_s: float = 15.0, segment_tokens: int = 64, seed: int = 0) -> Workload:
    """Short multi-turn chat (ShareGPT-like): a few shared system prompts, 1-6 short turns."""
    rng = np.random.default_rng(seed)
    sys_lens = [int(rng.integers(100, 600)) for _ in range(system_prompts)]
    t0, raw = 0.0, []
    for c in range(conversations):
        t0 += rng.exponential(1.0 / rate)
        sp = int(rng.integers(system_prompts))
        t, hist = t0, 0
        for _ in range(int(rng.integers(1, 7))):
            q = _lognormal(rng, 80, 1.0, 4, 2000)
            out = _lognormal(rng, 250, 0.8, 4, 2000)
            raw.append((t, [(1 + sp, sys_lens[sp]), (3_000_000 + c, hist + q)], out))
            hist += q + out
            t += 0.02 * out + rng.exponential(think_s)
    return _finish("sharegpt-like", segment_tokens, raw)


def generated_shared_prefix(groups: int = 64, prompts_per_group: int = 16,
                            system_prompt_len: int = 2048, question_len: int = 128,
                            output_len: int = 256, rate: float = 16.0,
                            segment_tokens: int = 128, seed: int = 0) -> Workload:
    """SGLang bench_serving's ``generated-shared-prefix``: groups share a long system prompt.

    Same defaults as ``--gsp-*`` (64 groups x 16 prompts, 2048-token system prompt,
    128-token question, 256 output tokens); requests shuffled, Poisson arrivals.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(groups * prompts_per_group)
    t, raw = 0.0, []
    for i in order:
        g = int(i) // prompts_per_group
        t += rng.exponential(1.0 / rate)
        raw.append((t, [(1 + g, system_prompt_len), (4_000_000 + int(i), question_len)],
                    output_len))
    return _finish("gsp", segment_tokens, raw)


GENERATORS = {
    "loogle": loogle_like,
    "scbench": scbench_like,
    "sharegpt": sharegpt_like,
    "gsp": generated_shared_prefix,
}


def load(name: str, limit: Optional[int] = None, seed: int = 0) -> Workload:
    """A workload by name: ``mooncake-conversation``, ``mooncake-synthetic``, a generator
    name (``loogle``, ``scbench``, ``sharegpt``, ``gsp``), or a path to a Mooncake JSONL."""
    if name.startswith("mooncake-"):
        return load_mooncake(data_dir() / f"{name.removeprefix('mooncake-')}_trace.jsonl", limit)
    if name in GENERATORS:
        w = GENERATORS[name](seed=seed)
        if limit is not None:
            w.requests = w.requests[:limit]
        return w
    if Path(name).exists():
        return load_mooncake(name, limit)
    raise ValueError(f"unknown workload {name!r}")
