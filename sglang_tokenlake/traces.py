"""What the simulator (``sim/``) and the harness (``bench/``) share to build workloads:
the Mooncake trace reader and the random samplers (Zipf popularity, bounded lognormal lengths).

Mooncake FAST'25 traces are JSONL, one request a line: ``timestamp`` (ms),
``input_length``, ``output_length`` and ``hash_ids`` (chained ids of 512-token blocks:
two requests share a prefix of ``k`` blocks exactly when their first ``k`` ids are equal).

Plain Python + numpy.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

MOONCAKE_BLOCK = 512
"""Tokens per Mooncake hash id."""


@dataclass(frozen=True)
class TraceRow:
    """One request of a Mooncake trace."""

    timestamp_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def mooncake_dir() -> Path:
    """Where the Mooncake traces are: ``$TOKENLAKE_MOONCAKE_DIR``, else ``shared/data/mooncake``
    next to (or above) the checkout."""
    env = os.environ.get("TOKENLAKE_MOONCAKE_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[1]
    for base in (root, root.parent):
        cand = base / "shared" / "data" / "mooncake"
        if cand.is_dir():
            return cand
    return root / "shared" / "data" / "mooncake"


def mooncake_path(trace: str | Path) -> Path:
    """``trace`` if it is a file, else ``<mooncake_dir>/<trace>_trace.jsonl``."""
    path = Path(trace)
    if path.exists():
        return path
    return mooncake_dir() / f"{trace}_trace.jsonl"


def read_mooncake(trace: str | Path, limit: Optional[int] = None, offset: int = 0) -> list[TraceRow]:
    """Rows ``offset .. offset + limit`` of a Mooncake trace (a name such as ``conversation``
    or a path), in file order."""
    path = mooncake_path(trace)
    if not path.exists():
        raise FileNotFoundError(f"Mooncake trace not found: {path} (set TOKENLAKE_MOONCAKE_DIR)")
    rows: list[TraceRow] = []
    with path.open() as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if limit is not None and len(rows) >= limit:
                break
            d = json.loads(line)
            rows.append(TraceRow(d["timestamp"] / 1000.0, int(d["input_length"]),
                                 int(d["output_length"]), tuple(int(h) for h in d["hash_ids"])))
    return rows


def zipf_weights(n: int, a: float) -> np.ndarray:
    """Probabilities of ranks ``1..n`` under Zipf(``a``): ``p_i ∝ i^-a``."""
    w = 1.0 / np.arange(1, n + 1) ** a
    return w / w.sum()


def lognormal(rng: np.random.Generator, mean: float, sigma: float, lo: int, hi: int) -> int:
    """A lognormal integer with mean ``mean`` (before clipping) and shape ``sigma``,
    rounded and clipped to ``[lo, hi]``."""
    mu = math.log(max(mean, 1.0)) - sigma * sigma / 2
    return int(min(hi, max(lo, round(rng.lognormal(mu, sigma)))))
