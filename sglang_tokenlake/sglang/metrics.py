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

        self.pool_bytes = Counter(
            "sglang:tokenlake_pool_bytes_total",
            "Bytes this worker moved through the pool, by kind: query (queries shipped to "
            "owners), partial (partial attention received), partial_served (sent as an "
            "owner), kv_pulled, kv_served, kv_put.",
            labelnames=[*names, "kind"],
        )
        self.pool_segments = Counter(
            "sglang:tokenlake_pool_segments_total",
            "Remote segments used by this worker's requests, by mode (ship, pull), and "
            "segments put to their homes (put).",
            labelnames=[*names, "mode"],
        )
        self.prefill_cost = Gauge(
            "sglang:tokenlake_prefill_seconds_per_token",
            "Seconds this worker takes to prefill one token, as dispatch's time model uses "
            "it (measured from its prefill passes, or pinned by --tokenlake-prefill-cost).",
            labelnames=names,
            multiprocess_mode="mostrecent",
        ).labels(**self._labels)
        self.link_rtt = Gauge(
            "sglang:tokenlake_link_rtt_seconds",
            "Round trip to a peer as dispatch's time model uses it (heartbeats).",
            labelnames=[*names, "peer"],
            multiprocess_mode="mostrecent",
        )
        self.link_ship_rtt = Gauge(
            "sglang:tokenlake_link_ship_rtt_seconds",
            "Round trip of one layer's shipped queries to a peer, its queueing and compute "
            "included (0 until measured).",
            labelnames=[*names, "peer"],
            multiprocess_mode="mostrecent",
        )
        self.link_bandwidth = Gauge(
            "sglang:tokenlake_link_bandwidth_bytes_per_second",
            "Bandwidth from a peer as dispatch's time model uses it (pulls).",
            labelnames=[*names, "peer"],
            multiprocess_mode="mostrecent",
        )
        self._seen: dict[str, float] = {}

    # pool counter -> (series, label name, label value)
    POOL = {
        "query_bytes": ("pool_bytes", "kind", "query"),
        "partial_bytes": ("pool_bytes", "kind", "partial"),
        "partial_bytes_served": ("pool_bytes", "kind", "partial_served"),
        "pulled_bytes": ("pool_bytes", "kind", "kv_pulled"),
        "served_bytes": ("pool_bytes", "kind", "kv_served"),
        "put_bytes": ("pool_bytes", "kind", "kv_put"),
        "shipped_segments": ("pool_segments", "mode", "ship"),
        "pulled_segments": ("pool_segments", "mode", "pull"),
        "put_segments": ("pool_segments", "mode", "put"),
    }

    def observe_pool(self, counters: dict[str, float]) -> None:
        """Export the growth of the pool's counters since the last call."""
        for name, (series, label, value) in self.POOL.items():
            v = float(counters.get(name, 0))
            delta = v - self._seen.get(name, 0.0)
            if delta > 0:
                getattr(self, series).labels(**self._labels, **{label: value}).inc(delta)
                self._seen[name] = v

    def observe_calibration(self, snapshot: dict) -> None:
        """Export the figures of dispatch's time model (``Calibration.snapshot``)."""
        self.prefill_cost.set(snapshot["prefill_s_per_token"])
        for peer, link in snapshot["links"].items():
            self.link_rtt.labels(**self._labels, peer=peer).set(link["rtt_s"])
            self.link_ship_rtt.labels(**self._labels, peer=peer).set(link["ship_rtt_s"])
            self.link_bandwidth.labels(**self._labels, peer=peer).set(link["bandwidth_Bps"])

    def observe_request(self, hit: int, miss: int) -> None:
        if hit:
            self.hit_tokens.inc(hit)
        if miss:
            self.miss_tokens.inc(miss)

    def set_occupancy(self, cached_tokens: int, segments: int) -> None:
        self.cached_tokens.set(cached_tokens)
        self.segments.set(segments)
