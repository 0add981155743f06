"""Token-level workloads for the harness: exact ``input_ids`` prompts, arrival times, sessions.

Every generator is seeded and returns a :class:`BenchWorkload` whose requests carry
token ids (``3 <= id < vocab``), so the same command replays the identical request
sequence against every configuration and token counts are exact.

Shapes (sized for a CPU run by default; scale them up with the flags on a GPU):

``docs``      shared long documents, many questions each (LooGLE-like): prompt =
              document + a fresh question, documents Zipf-popular, Poisson arrivals.
``longdoc``   the LooGLE regime scaled to a small host: about twice as many long shared
              contexts (3-6K tokens) as workers, Zipf-popular, short questions and
              answers, so each worker's KV (``--max-total-tokens 8192``) holds only
              one or two contexts and placement decides the hit rate.
``chat``      multi-turn sessions over a shared context with growing history
              (SCBench-like): turn ``t`` = previous prompt + the previous *answer as
              generated* + a new question; sent ``think`` seconds after that answer.
``gsp``       SGLang's generated-shared-prefix: groups share a system prompt.
``mooncake``  the Mooncake FAST'25 traces (``hash_ids`` of 512-token blocks), scaled:
              each block becomes ``block_tokens`` tokens (same ids -> same tokens),
              lengths shrink by ``block_tokens / 512``, arrivals keep the trace's
              shape and are rescaled to the requested rate.

Arrival times are generated at unit scale and stretched by :meth:`BenchWorkload.at_rate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np

from sglang_tokenlake.traces import (
    MOONCAKE_BLOCK,
    lognormal,
    mooncake_path,
    read_mooncake,
    zipf_weights,
)

LOW_TOKEN = 3  # ids 0..2 are <s>, </s>, <pad> in the tiny model


@dataclass(frozen=True)
class BenchRequest:
    rid: str
    arrival_s: float
    """Scheduled send time (s from the start). A follow-up turn is sent at
    ``max(arrival_s, parent finished + think_s)``."""
    input_ids: tuple[int, ...]
    """The whole prompt; for a follow-up turn only the new user turn (see ``parent``)."""
    max_new_tokens: int
    group: str = ""
    """What the prompt shares with others (document, session, system prompt)."""
    parent: Optional[str] = None
    """Previous turn of the session: the prompt is parent prompt + parent output + input_ids."""
    think_s: float = 0.0


@dataclass
class BenchWorkload:
    name: str
    requests: list[BenchRequest]
    params: dict[str, Any] = field(default_factory=dict)

    def at_rate(self, rate: float) -> BenchWorkload:
        """Arrivals stretched so that requests come at ``rate`` per second on average.

        Follow-up turns are paced by their parents; only the scheduled arrivals scale,
        so for ``chat`` the session start rate is ``rate / turns``.
        """
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        span = self.requests[-1].arrival_s if self.requests else 0.0
        n = len(self.requests)
        native = n / span if span > 0 else rate
        f = native / rate
        reqs = [replace(r, arrival_s=r.arrival_s * f) for r in self.requests]
        return BenchWorkload(self.name, reqs, {**self.params, "rate": rate})

    def summary(self) -> dict[str, Any]:
        n = len(self.requests)
        first = [r for r in self.requests if r.parent is None]
        return {
            "name": self.name,
            "requests": n,
            "sessions_or_roots": len(first),
            "mean_prompt_tokens_scheduled": round(
                sum(len(r.input_ids) for r in self.requests) / max(n, 1), 1),
            "mean_output_tokens": round(sum(r.max_new_tokens for r in self.requests) / max(n, 1), 1),
            "duration_s": round(self.requests[-1].arrival_s if n else 0.0, 2),
            "params": self.params,
        }


def _tokens(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(LOW_TOKEN, vocab, size=max(int(n), 0)).tolist()


def docs(requests: int = 240, documents: int = 20, doc_tokens: int = 1536,
         question_tokens: int = 48, output_tokens: int = 24, zipf_a: float = 0.8,
         vocab: int = 1024, seed: int = 0) -> BenchWorkload:
    """Shared long documents with many questions (LooGLE-like), Zipf(``zipf_a``) popularity.

    Document lengths are lognormal around ``doc_tokens`` (0.5x..1.5x); questions
    16..2x``question_tokens``; answers lognormal around ``output_tokens``.
    """
    rng = np.random.default_rng(seed)
    lens = [lognormal(rng, doc_tokens, 0.3, doc_tokens // 2, doc_tokens * 3 // 2)
            for _ in range(documents)]
    texts = [_tokens(rng, n, vocab) for n in lens]
    pick = rng.choice(documents, size=requests, p=zipf_weights(documents, zipf_a))
    t, out = 0.0, []
    for i, d in enumerate(pick):
        t += rng.exponential(1.0)
        q = int(rng.integers(16, 2 * question_tokens + 1))
        out.append(BenchRequest(f"docs-{i}", t, tuple(texts[d] + _tokens(rng, q, vocab)),
                                lognormal(rng, output_tokens, 0.4, 4, 4 * output_tokens),
                                group=f"doc{d}"))
    return BenchWorkload("docs", out, dict(documents=documents, doc_tokens=doc_tokens,
                                           unique_doc_tokens=sum(lens), zipf_a=zipf_a,
                                           question_tokens=question_tokens,
                                           output_tokens=output_tokens, seed=seed))


LONGDOC_MAX_TOTAL_TOKENS = 8192
"""Suggested per-worker ``--max-total-tokens`` for ``longdoc``: one or two contexts, and
more than the longest prompt + answer (SGLang rejects a request that cannot fit)."""


def longdoc(requests: int = 200, contexts: int = 8, context_min_tokens: int = 3072,
            context_max_tokens: int = 6144, question_min_tokens: int = 16,
            question_max_tokens: int = 32, output_tokens: int = 16, zipf_a: float = 1.0,
            vocab: int = 1024, seed: int = 0) -> BenchWorkload:
    """Long shared contexts, short questions and answers (LooGLE's regime, scaled down).

    ``contexts`` contexts (the harness defaults it to twice ``--workers``) of uniformly
    ``context_min_tokens..context_max_tokens`` tokens, Zipf(``zipf_a``)-popular; each
    request is a context + a fresh question of ``question_min..max_tokens`` and asks
    for ``output_tokens`` tokens; Poisson arrivals. With ``--max-total-tokens
    8192`` (``LONGDOC_MAX_TOTAL_TOKENS``) a worker holds one or two contexts, so the
    working set is several times what one worker can cache: prefill of a 3-6K context
    dominates a request and the hit rate is what the cache layout earns.
    """
    if not 0 < context_min_tokens <= context_max_tokens:
        raise ValueError("longdoc wants 0 < context_min_tokens <= context_max_tokens")
    if not 0 < question_min_tokens <= question_max_tokens:
        raise ValueError("longdoc wants 0 < question_min_tokens <= question_max_tokens")
    rng = np.random.default_rng(seed)
    lens = rng.integers(context_min_tokens, context_max_tokens + 1, size=contexts).tolist()
    texts = [_tokens(rng, n, vocab) for n in lens]
    pick = rng.choice(contexts, size=requests, p=zipf_weights(contexts, zipf_a))
    t, out = 0.0, []
    for i, d in enumerate(pick):
        t += rng.exponential(1.0)
        q = int(rng.integers(question_min_tokens, question_max_tokens + 1))
        out.append(BenchRequest(f"longdoc-{i}", t, tuple(texts[d] + _tokens(rng, q, vocab)),
                                output_tokens, group=f"ctx{d}"))
    return BenchWorkload("longdoc", out, dict(
        contexts=contexts, context_tokens=[int(n) for n in lens], unique_context_tokens=sum(lens),
        zipf_a=zipf_a, question_tokens=[question_min_tokens, question_max_tokens],
        output_tokens=output_tokens, suggested_max_total_tokens=LONGDOC_MAX_TOTAL_TOKENS,
        seed=seed))


def chat(sessions: int = 40, contexts: int = 8, context_tokens: int = 1024, turns: int = 4,
         question_tokens: int = 48, output_tokens: int = 32, think_s: float = 1.0,
         vocab: int = 1024, seed: int = 0) -> BenchWorkload:
    """Multi-turn chat with growing history over Zipf-shared contexts (SCBench-like).

    A session picks a context, then asks ``turns`` questions; every turn's prompt is
    the whole conversation so far, including the answers the server generated.
    """
    rng = np.random.default_rng(seed)
    lens = [lognormal(rng, context_tokens, 0.3, context_tokens // 2, context_tokens * 3 // 2)
            for _ in range(contexts)]
    texts = [_tokens(rng, n, vocab) for n in lens]
    pick = rng.choice(contexts, size=sessions, p=zipf_weights(contexts, 0.8))
    t, out = 0.0, []
    for s, c in enumerate(pick):
        t += rng.exponential(float(turns))  # unit request rate: sessions every `turns` s
        parent: Optional[str] = None
        for k in range(turns):
            q = _tokens(rng, int(rng.integers(16, 2 * question_tokens + 1)), vocab)
            rid = f"chat-{s}-{k}"
            ids = (texts[c] + q) if parent is None else q
            out.append(BenchRequest(rid, t, tuple(ids),
                                    lognormal(rng, output_tokens, 0.4, 4, 4 * output_tokens),
                                    group=f"session{s}", parent=parent,
                                    think_s=float(rng.exponential(think_s)) if parent else 0.0))
            parent = rid
    out.sort(key=lambda r: r.arrival_s)
    return BenchWorkload("chat", out, dict(sessions=sessions, contexts=contexts,
                                           context_tokens=context_tokens, turns=turns,
                                           think_s=think_s, seed=seed))


def gsp(groups: int = 16, prompts_per_group: int = 12, system_prompt_tokens: int = 1024,
        question_tokens: int = 64, output_tokens: int = 24, vocab: int = 1024,
        seed: int = 0) -> BenchWorkload:
    """SGLang bench_serving's generated-shared-prefix, scaled: shuffled, Poisson arrivals."""
    rng = np.random.default_rng(seed)
    system = [_tokens(rng, system_prompt_tokens, vocab) for _ in range(groups)]
    order = rng.permutation(groups * prompts_per_group)
    t, out = 0.0, []
    for i in order:
        g = int(i) // prompts_per_group
        t += rng.exponential(1.0)
        out.append(BenchRequest(f"gsp-{int(i)}", t,
                                tuple(system[g] + _tokens(rng, question_tokens, vocab)),
                                output_tokens, group=f"group{g}"))
    return BenchWorkload("gsp", out, dict(groups=groups, prompts_per_group=prompts_per_group,
                                          system_prompt_tokens=system_prompt_tokens,
                                          question_tokens=question_tokens,
                                          output_tokens=output_tokens, seed=seed))


def mooncake(trace: str = "conversation", requests: int = 200, block_tokens: int = 32,
             max_prompt_tokens: int = 3072, max_output_tokens: int = 48, offset: int = 0,
             vocab: int = 1024, seed: int = 0) -> BenchWorkload:
    """A Mooncake trace (``conversation``, ``synthetic`` or a JSONL path), scaled to the machine.

    Block ``h`` becomes ``block_tokens`` tokens drawn from a generator seeded by
    ``(seed, h)``: equal hash ids give equal tokens, so prefixes are shared exactly
    where the trace shares them. Prompt and output lengths are multiplied by
    ``block_tokens / 512`` (prompts capped at ``max_prompt_tokens``, outputs at
    ``max_output_tokens``).
    """
    path = mooncake_path(trace)
    scale = block_tokens / MOONCAKE_BLOCK
    rows = read_mooncake(path, requests, offset)
    if not rows:
        raise ValueError(f"no requests in {path} after offset {offset}")
    blocks: dict[int, list[int]] = {}
    t0 = rows[0].timestamp_s
    out = []
    for i, d in enumerate(rows):
        n = min(max_prompt_tokens, max(1, math.ceil(d.input_length * scale)))
        ids: list[int] = []
        for h in d.hash_ids:
            if len(ids) >= n:
                break
            if h not in blocks:
                blocks[h] = _tokens(np.random.default_rng([seed, int(h)]), block_tokens, vocab)
            ids += blocks[h]
        ids = ids[:n]
        ids += _tokens(np.random.default_rng([seed, 1 << 40, i]), n - len(ids), vocab)
        outn = min(max_output_tokens, max(1, math.ceil(d.output_length * scale)))
        # +1 ms keeps the span positive when the first rows share a timestamp.
        out.append(BenchRequest(f"mooncake-{offset + i}", d.timestamp_s - t0 + 1e-3,
                                tuple(ids), outn, group=f"h{d.hash_ids[0]}"
                                if d.hash_ids else ""))
    out.sort(key=lambda r: r.arrival_s)
    return BenchWorkload(f"mooncake-{path.stem.replace('_trace', '')}", out,
                         dict(trace=str(path), block_tokens=block_tokens,
                              max_prompt_tokens=max_prompt_tokens,
                              max_output_tokens=max_output_tokens, offset=offset))


GENERATORS: dict[str, Callable[..., BenchWorkload]] = {
    "docs": docs, "longdoc": longdoc, "chat": chat, "gsp": gsp, "mooncake": mooncake,
}


def build(name: str, overrides: Optional[dict[str, Any]] = None, seed: int = 0,
          vocab: int = 1024) -> BenchWorkload:
    """A workload by name (``docs``, ``longdoc``, ``chat``, ``gsp``, ``mooncake``,
    ``mooncake-synthetic``)."""
    kw: dict[str, Any] = dict(overrides or {})
    if name.startswith("mooncake-"):
        kw.setdefault("trace", name.removeprefix("mooncake-"))
        name = "mooncake"
    if name not in GENERATORS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(GENERATORS)} "
                         f"or mooncake-<trace>")
    return GENERATORS[name](seed=seed, vocab=vocab, **kw)


def full_prompt(req: BenchRequest, done: dict[str, tuple[Sequence[int], Sequence[int]]]
                ) -> list[int]:
    """The prompt actually sent: for a follow-up turn, parent prompt + parent output + own turn."""
    if req.parent is None:
        return list(req.input_ids)
    prompt, output = done[req.parent]
    return list(prompt) + list(output) + list(req.input_ids)
