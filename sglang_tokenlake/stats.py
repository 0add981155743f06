"""Counters of one worker's cache (plain Python; exported by the adapter)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang_tokenlake.tree import SegmentNode


@dataclass
class CacheStats:
    """Token and segment counters since start-up.

    ``hit_tokens``/``miss_tokens`` count each finished request once: its prompt
    tokens served from the cache versus computed.
    """

    requests: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    lookups: int = 0
    lookup_memo_hits: int = 0  # lookups that reused the request's key chain
    inserted_segments: int = 0
    duplicate_segments: int = 0
    evicted_segments: int = 0
    evicted_transient_segments: int = 0  # of those, copies of segments homed elsewhere
    evicted_last_copies: int = 0  # of those, segments no other worker held: lost to the pool
    pulled_tokens: int = 0
    shipped_tokens: int = 0
    pull_fallbacks: int = 0

    def finish(self, prompt_tokens: int, cached_tokens: int) -> int:
        """Count a finished request; return its hit tokens (at most its prompt)."""
        hit = min(cached_tokens, prompt_tokens)
        self.hit_tokens += hit
        self.miss_tokens += prompt_tokens - hit
        self.requests += 1
        return hit

    def count_evicted(self, nodes: Iterable[SegmentNode]) -> None:
        """Count dropped local copies: all, the transient ones, and the pool's last
        copies (no other worker known to hold the segment, a spill's target included:
        its next use recomputes it)."""
        for n in nodes:
            self.evicted_segments += 1
            self.evicted_transient_segments += not n.designated
            self.evicted_last_copies += not n.owners

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = dict(asdict(self))
        d["hit_rate"] = self.hit_rate
        return d
