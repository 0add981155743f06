"""Prometheus series of the TokenLake cache (only built with --enable-metrics).

SGLang runs prometheus_client in multiprocess mode: series created in the
scheduler process are exported by the server's /metrics endpoint.
"""

from __future__ import annotations


class TokenLakeMetrics:
    def __init__(self, labels: dict[str, object]) -> None:
        # Imported here: prometheus_client must be imported after SGLang has
        # set PROMETHEUS_MULTIPROC_DIR.
        from prometheus_client import Counter, Gauge

        names = list(labels.keys())
        self._labels = {k: str(v) for k, v in labels.items()}
        self.hit_tokens = Counter(
            "sglang:tokenlake_hit_tokens_total",
            "Prompt tokens of finished requests served from the TokenLake cache.",
            labelnames=names,
        ).labels(**self._labels)
        self.miss_tokens = Counter(
            "sglang:tokenlake_miss_tokens_total",
            "Prompt tokens of finished requests that had to be computed.",
            labelnames=names,
        ).labels(**self._labels)
        self.cached_tokens = Gauge(
            "sglang:tokenlake_cached_tokens",
            "Tokens of KV held by the TokenLake segment tree on this worker.",
            labelnames=names,
            multiprocess_mode="mostrecent",
        ).labels(**self._labels)
        self.segments = Gauge(
            "sglang:tokenlake_local_segments",
            "Segments held by the TokenLake segment tree on this worker.",
            labelnames=names,
            multiprocess_mode="mostrecent",
        ).labels(**self._labels)

    def observe_request(self, hit: int, miss: int) -> None:
        if hit:
            self.hit_tokens.inc(hit)
        if miss:
            self.miss_tokens.inc(miss)

    def set_occupancy(self, cached_tokens: int, segments: int) -> None:
        self.cached_tokens.set(cached_tokens)
        self.segments.set(segments)
