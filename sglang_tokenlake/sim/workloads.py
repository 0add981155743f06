"""Workloads for the simulator: the Mooncake traces and five generated shapes.

A request is reduced to what the cache policies see: arrival time, prompt and
output lengths, and one chained key per block of the prompt (``keys[i]`` names
the first ``(i+1) * segment_size`` tokens, so two requests share a prefix of
``k`` blocks exactly when their first ``k`` keys are equal). Only the first
``input_tokens // segment_size`` blocks are full and cacheable; a partial last
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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from sglang_tokenlake.dispatch import ModelShape
from sglang_tokenlake.segments import chain_key, request_namespace
from sglang_tokenlake.traces import MOONCAKE_BLOCK, lognormal, read_mooncake, zipf_weights


@dataclass(frozen=True)
class Request:
    arrival_s: float
    """Arrival time in seconds from the start of the workload (before rate scaling)."""
    input_tokens: int
    output_tokens: int
    keys: tuple[int, ...]
    """One chained key per prompt block, ``ceil(input_tokens / segment_size)`` of them."""


@dataclass
class Workload:
    name: str
    segment_size: int
    requests: list[Request] = field(default_factory=list)
    shape: Optional[ModelShape] = None
    """The served model's attention shape when the workload implies one (else the
    simulator's default, a Llama-3-8B-like GQA model)."""

    def full_blocks(self, r: Request) -> int:
        """Cacheable (full) blocks of ``r``."""
        return min(r.input_tokens // self.segment_size, len(r.keys))

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
            "segment_size": self.segment_size,
            "duration_s": round(self.duration_s(), 3),
            "mean_input_tokens": round(tin / max(n, 1), 1),
            "mean_output_tokens": round(sum(r.output_tokens for r in self.requests) / max(n, 1), 1),
            "unique_full_blocks": uniq,
            # Token hit rate of an infinite cache: every repeated full block hits.
            "infinite_cache_hit_rate": round((full - uniq) * self.segment_size / max(tin, 1), 4),
        }


# -- Mooncake ------------------------------------------------------------------


def load_mooncake(trace: str | Path, limit: Optional[int] = None) -> Workload:
    """A Mooncake FAST'25 trace (``conversation``, ``synthetic`` or a JSONL path)."""
    reqs = [Request(r.timestamp_s, r.input_length, max(r.output_length, 1), r.hash_ids)
            for r in read_mooncake(trace, limit)]
    reqs.sort(key=lambda r: r.arrival_s)
    stem = Path(trace).stem if Path(trace).exists() else str(trace)
    return Workload(f"mooncake-{stem.replace('_trace', '')}", MOONCAKE_BLOCK, reqs)


def mooncake_tokens(hash_ids: Sequence[int], input_tokens: int, vocab: int = 32000) -> np.ndarray:
    """Token ids for a Mooncake request: 512 deterministic tokens per hash id, cut to length."""
    blocks = [np.random.default_rng(h).integers(0, vocab, MOONCAKE_BLOCK) for h in hash_ids]
    out = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
    return out[:input_tokens].astype(np.int64)


# -- generated shapes ------------------------------------------------------------

_SEED = request_namespace("tokenlake-sim")


def piece_keys(pieces: Sequence[tuple[int, int]], segment_size: int) -> tuple[int, ...]:
    """Chained keys of a prompt made of ``(source, length)`` pieces (each from its stream's start)."""
    bounds = []  # (global start, global end, source)
    pos = 0
    for src, n in pieces:
        if n > 0:
            bounds.append((pos, pos + n, src))
            pos += n
    keys: list[int] = []
    parent, j = _SEED, 0
    for b in range(math.ceil(pos / segment_size)):
        lo, hi = b * segment_size, min((b + 1) * segment_size, pos)
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


def _finish(name: str, seg: int, raw: list[tuple[float, list[tuple[int, int]], int]],
            shape: Optional[ModelShape] = None) -> Workload:
    raw.sort(key=lambda t: t[0])
    reqs = [Request(t, sum(n for _, n in pieces), out, piece_keys(pieces, seg))
            for t, pieces, out in raw]
    return Workload(name, seg, reqs, shape)


def loogle_like(requests: int = 3000, docs: int = 120, doc_tokens: float = 24000,
                zipf_a: float = 1.0, rate: float = 2.0, segment_size: int = 256,
                seed: int = 0) -> Workload:
    """Shared long documents, many questions each (LooGLE-like), documents Zipf-popular.

    Prompt = document (lognormal, mean ``doc_tokens``) + a fresh question (20-200
    tokens); outputs are short answers (lognormal mean 120). Poisson arrivals.
    """
    rng = np.random.default_rng(seed)
    lens = [lognormal(rng, doc_tokens, 0.5, 4000, 96000) for _ in range(docs)]
    pick = rng.choice(docs, size=requests, p=zipf_weights(docs, zipf_a))
    t, raw = 0.0, []
    for r, d in enumerate(pick):
        t += rng.exponential(1.0 / rate)
        q = int(rng.integers(20, 200))
        raw.append((t, [(1 + int(d), lens[d]), (1_000_000 + r, q)],
                    lognormal(rng, 120, 0.6, 8, 1024)))
    return _finish("loogle-like", segment_size, raw)


def scbench_like(sessions: int = 300, contexts: int = 60, context_tokens: float = 60000,
                 turns: int = 5, rate: float = 0.5, think_s: float = 20.0,
                 segment_size: int = 256, seed: int = 0) -> Workload:
    """Multi-turn sessions over long shared contexts with growing history (SCBench-like).

    Each session picks a context (Zipf over ``contexts``), then asks ``turns``
    questions; turn ``t``'s prompt is the context + all earlier questions and answers
    + the new question. Sessions start Poisson(``rate``); turns follow after the
    previous answer plus an exponential think time.
    """
    rng = np.random.default_rng(seed)
    lens = [lognormal(rng, context_tokens, 0.6, 8000, 200000) for _ in range(contexts)]
    pick = rng.choice(contexts, size=sessions, p=zipf_weights(contexts, 0.8))
    t0, raw = 0.0, []
    for s, c in enumerate(pick):
        t0 += rng.exponential(1.0 / rate)
        t, hist = t0, 0
        for _ in range(turns):
            q = lognormal(rng, 150, 0.7, 10, 2000)
            out = lognormal(rng, 300, 0.7, 10, 2000)
            raw.append((t, [(1 + int(c), lens[c]), (2_000_000 + s, hist + q)], out))
            hist += q + out
            t += 0.03 * out + rng.exponential(think_s)
    return _finish("scbench-like", segment_size, raw)


def sharegpt_like(conversations: int = 3000, system_prompts: int = 8, rate: float = 8.0,
                  think_s: float = 15.0, segment_size: int = 64, seed: int = 0) -> Workload:
    """Short multi-turn chat (ShareGPT-like): a few shared system prompts, 1-6 short turns."""
    rng = np.random.default_rng(seed)
    sys_lens = [int(rng.integers(100, 600)) for _ in range(system_prompts)]
    t0, raw = 0.0, []
    for c in range(conversations):
        t0 += rng.exponential(1.0 / rate)
        sp = int(rng.integers(system_prompts))
        t, hist = t0, 0
        for _ in range(int(rng.integers(1, 7))):
            q = lognormal(rng, 80, 1.0, 4, 2000)
            out = lognormal(rng, 250, 0.8, 4, 2000)
            raw.append((t, [(1 + sp, sys_lens[sp]), (3_000_000 + c, hist + q)], out))
            hist += q + out
            t += 0.02 * out + rng.exponential(think_s)
    return _finish("sharegpt-like", segment_size, raw)


def generated_shared_prefix(groups: int = 64, prompts_per_group: int = 16,
                            system_prompt_len: int = 2048, question_len: int = 128,
                            output_len: int = 256, rate: float = 16.0,
                            segment_size: int = 128, seed: int = 0) -> Workload:
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
    return _finish("gsp", segment_size, raw)


MHA_7B = ModelShape(layers=32, q_heads=32, kv_heads=32, head_dim=128, dtype_bytes=2)
"""A Llama-2-7B-like multi-head-attention model: 512 KiB of KV per token (4x the GQA default)."""


def longctx(requests: int = 2000, contexts: int = 8, min_tokens: int = 16384,
            max_tokens: int = 32768, zipf_a: float = 1.0, rate: float = 1.0,
            segment_size: int = 256, seed: int = 0) -> Workload:
    """A few long shared contexts under a multi-head-attention model, short Q&A on them.

    ``contexts`` contexts of ``min_tokens..max_tokens`` tokens (uniform), Zipf(``zipf_a``)
    popular; prompt = context + a fresh question (20-200 tokens); answers lognormal
    mean 100 (8..512). The model is ``MHA_7B``, so one context's KV is 8-16 GiB: run it with
    a capacity of one or two contexts per instance (e.g. ``--capacity 0.125 0.25`` at 4
    instances) to see what cache affinity costs when the cache cannot hold every context.
    """
    rng = np.random.default_rng(seed)
    lens = [int(x) for x in rng.integers(min_tokens, max_tokens + 1, size=contexts)]
    pick = rng.choice(contexts, size=requests, p=zipf_weights(contexts, zipf_a))
    t, raw = 0.0, []
    for r, c in enumerate(pick):
        t += rng.exponential(1.0 / rate)
        q = int(rng.integers(20, 200))
        raw.append((t, [(5_000_000 + int(c), lens[c]), (6_000_000 + r, q)],
                    lognormal(rng, 100, 0.6, 8, 512)))
    return _finish("longctx", segment_size, raw, MHA_7B)


GENERATORS = {
    "longctx": longctx,
    "loogle": loogle_like,
    "scbench": scbench_like,
    "sharegpt": sharegpt_like,
    "gsp": generated_shared_prefix,
}


def load(name: str, limit: Optional[int] = None, seed: int = 0) -> Workload:
    """A workload by name: ``mooncake-conversation``, ``mooncake-synthetic``, a generator
    name (``loogle``, ``scbench``, ``sharegpt``, ``gsp``, ``longctx``), or a path to a
    Mooncake JSONL."""
    if name.startswith("mooncake-"):
        return load_mooncake(name.removeprefix("mooncake-"), limit)
    if name in GENERATORS:
        w = GENERATORS[name](seed=seed)
        if limit is not None:
            w.requests = w.requests[:limit]
        return w
    if Path(name).exists():
        return load_mooncake(name, limit)
    raise ValueError(f"unknown workload {name!r}")
