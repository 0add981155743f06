"""Where segments live: weighted rendezvous (highest-random-weight) hashing.

Every worker computes the same homes for a segment from the same live member
set, without asking anyone. Weights are capacities (KV tokens offered to the
pool): a member with twice the capacity is home to about twice the segments.
A join or a leave moves only the segments whose top choice changed, about
``1/N`` of them.

Score of member ``m`` for key ``k`` (weighted rendezvous, logarithmic method)::

    h = XXH3-64(k as 8 bytes; seed = hash of m) mapped into (0, 1)
    score = -weight(m) / ln(h)

Plain Python + xxhash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import xxhash

_TWO64 = float(1 << 64)


@lru_cache(maxsize=4096)
def _member_seed(member: str) -> int:
    return xxhash.xxh3_64_intdigest(member.encode("utf-8"))


def score(key: int, member: str, weight: float = 1.0) -> float:
    h = xxhash.xxh3_64_intdigest(key.to_bytes(8, "little"), _member_seed(member))
    u = (h + 0.5) / _TWO64  # in (0, 1)
    return -weight / math.log(u)


def homes(key: int, members: Mapping[str, float], n: int = 1) -> list[str]:
    """The ``n`` highest-scoring members for ``key`` (best first).

    Args:
        key: a 64-bit segment key.
        members: live member id -> weight (capacity); weights must be positive.
        n: how many homes (the first is the primary; more for replicas).
    """
    if not members:
        raise ValueError("no live members")
    if n == 1:
        best, best_s = "", -1.0
        for m, w in members.items():
            s = score(key, m, w)
            if s > best_s or (s == best_s and m < best):
                best, best_s = m, s
        return [best]
    ranked = sorted(members.items(), key=lambda mw: (-score(key, mw[0], mw[1]), mw[0]))
    return [m for m, _ in ranked[:n]]


def home(key: int, members: Mapping[str, float]) -> str:
    return homes(key, members, 1)[0]
