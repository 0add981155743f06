"""The one configuration record of TokenLake; its CLI flags are generated from it.

Every field becomes ``--tokenlake-<name-with-dashes>`` on ``python -m
sglang.launch_server`` (see ``sglang_tokenlake.sglang.plugin``); the help text is
the field's ``help`` metadata, the default is the field's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Optional, get_type_hints

from sglang_tokenlake.policy import PLACEMENTS, REMOTE_MODES, PolicyConfig

FLAG_PREFIX = "tokenlake"
BROKER_PORT_OFFSET = 1000
"""A worker's broker listens on its HTTP --port + this unless --tokenlake-port is set."""
_POLICY = PolicyConfig()  # the policy's defaults are the flags' defaults


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TokenLakeConfig:
    """Settings of one TokenLake worker (and, through its peers, of the pool)."""

    segment_size: int = _f(
        256,
        "Tokens per pooled segment. Only full segments are cached; the tail shorter "
        "than a segment is recomputed. Must be a positive multiple of --page-size.",
    )
    namespace: Optional[str] = _f(
        None,
        "Namespace mixed into every segment key. Workers share segments only within "
        "one namespace. Default: the served model path, its --revision, a digest of its "
        "weight files (names, sizes, sampled content, config.json) and --weight-version, "
        "derived again after every weight update, so KV of other weights is never shared "
        "(updates from tensors change it only through their weight_version).",
    )
    verify_tokens: bool = _f(
        True,
        "Compare the stored token ids of every local segment on a match, so a 64-bit "
        "key collision can never serve the wrong KV.",
    )
    host: str = _f(
        "127.0.0.1",
        "Address this worker's TokenLake broker binds to (status queries; pool "
        "traffic). Loopback by default; a routable address (to pool across hosts) needs "
        "--tokenlake-curve-dir, or --tokenlake-insecure.",
    )
    port: int = _f(
        0,
        "Port of this worker's TokenLake broker. 0 picks --port + 1000.",
    )
    peers: str = _f(
        "",
        "Comma-separated broker addresses (HOST:PORT, i.e. --tokenlake-host:--tokenlake-port) "
        "of other workers of the pool. Any one live member is enough to join: members "
        "learn each other from heartbeats. Empty: a pool of one until someone joins.",
    )
    advertise_host: Optional[str] = _f(
        None,
        "Host other workers use to reach this broker (default: --tokenlake-host). Needed "
        "when binding to 0.0.0.0.",
    )
    heartbeat_interval: float = _f(
        0.5, "Seconds between heartbeats to every peer."
    )
    peer_timeout: float = _f(
        3.0,
        "A peer not heard from for this many seconds leaves the placement (its segments "
        "are no longer pulled from it); it rejoins when it answers again.",
    )
    pull_timeout: float = _f(
        2.0,
        "Seconds a request waits for KV pulled from other workers before it recomputes "
        "those tokens instead.",
    )
    kv_stream: bool = _f(
        True,
        "Serve and fetch pulled KV over a plain TCP connection per peer (its port "
        "travels with heartbeats; any free port on --tokenlake-host), read by the thread "
        "that asked, instead of through the ZeroMQ broker: several times faster for "
        "segment-sized transfers. Only without --tokenlake-curve-dir: a pool with CURVE "
        "keeps all traffic on its encrypted broker.",
    )
    transient_copies: bool = _f(
        True,
        "Keep copies of segments whose home is another worker (computed or pulled here) "
        "as first-to-evict extras. Off: drop them as soon as no request uses them, so the "
        "pool holds exactly one copy of each unreplicated segment.",
    )
    remote_mode: str = _f(
        "auto",
        "How a request uses prefix segments held by other workers: 'ship' sends its "
        "queries to the owners and merges their partial attention (no local memory for "
        "those segments), 'pull' copies their KV here, 'auto' picks per owner whichever "
        "takes the least time by the worker's measured costs (recomputing when neither "
        "pays off).",
        choices=("auto", "ship", "pull"),
    )
    match_waiting: bool = _f(
        True,
        "Match every waiting request against the cache at each scheduling round (SGLang's "
        "fast-match contract, as its cache-aware schedule policies do), not only the ones "
        "being admitted: pulls of a request's remote segments start while it waits, the "
        "local segments waiting requests need stay recently used, and hotness counts a "
        "request when it arrives.",
    )
    query_timeout: float = _f(
        5.0,
        "Seconds one forward pass may wait, over all its layers together, for owners' "
        "partial attention; an owner that does not answer within what is left makes "
        "the request start over, recomputing or pulling instead.",
    )
    prefill_cost: Optional[float] = _f(
        None,
        "Seconds this worker takes to prefill one token, for dispatch's time model "
        "(ship / pull / recompute). Default: measured from its own prefill passes, as the "
        "slope of pass time over tokens prefilled (an A100-like prior until then).",
    )
    link_rtt: Optional[float] = _f(
        None,
        "Seconds of one round trip to a peer, for dispatch's time model (shipping pays "
        "one per layer per forward pass). Default: measured per peer from heartbeats.",
    )
    link_bandwidth: Optional[float] = _f(
        None,
        "Bytes per second of a transfer from a peer, for dispatch's time model. "
        "Default: measured per peer from the sizes and durations of pulls.",
    )
    lease_ttl: float = _f(
        60.0,
        "Seconds an owner keeps a lease (segments pinned for a requester that ships "
        "queries to them) without a query under it; every query renews it. A lease "
        "whose requester died or whose release was lost ends after this.",
    )
    replica_budget: float = _f(
        _POLICY.replica_budget,
        "Share of the pool's KV capacity that extra replicas of hot segments may occupy "
        "(0 turns replication off). Hot segments are found by a sliding-window top-k "
        "counter of segment accesses, merged over all members through heartbeats, and "
        "get replicas in proportion to their pool-wide share.",
    )
    hot_window: int = _f(
        _POLICY.hot_window,
        "Segment accesses each member's hotness estimate covers (a sliding window).",
    )
    hot_k: int = _f(
        _POLICY.hot_k,
        "Counters of the hotness estimate (top-k); also how many hot segments each "
        "heartbeat carries. Shares below 1/k cannot be told apart.",
    )
    replan_every: int = _f(
        _POLICY.replan_every, "Requests (pool-wide) between replica plans."
    )
    placement_choices: int = _f(
        _POLICY.placement_choices,
        "With --tokenlake-placement segment or chain: a new segment (chain: the deepest of "
        "a request's new segments) is kept by whichever of its best N rendezvous homes has "
        "the largest eviction horizon (announced with heartbeats); 1 always uses the first.",
    )
    placement: str = _f(
        _POLICY.placement,
        "Where the segments a request adds to the pool are kept: executor (all on the "
        "worker that computed them: nothing is sent, and a context stays whole on one "
        "worker), chain (all at the home of the deepest) or segment (each at its own home, "
        "spread over the pool). Any worker holding a segment may be its home except with "
        "segment; when two hold one, the first in rendezvous order keeps it.",
        choices=PLACEMENTS,
    )
    pool_leaf_first: bool = _f(
        _POLICY.pool_leaf_first,
        "Keep the last copy in the pool of a segment whose children are cached somewhere "
        "(evict another segment first): a prefix is usable only from its root.",
    )
    spill_margin: float = _f(
        _POLICY.spill_margin,
        "A worker about to evict the pool's last copy of a segment sends it to the worker "
        "whose least recently used data is older than this many times the segment's age "
        "(the oldest such, by the eviction horizons announced with heartbeats), which "
        "evicts that older data instead: the pool then drops its least recently used "
        "segments, not each worker its own. 0 (default) turns it off; 1-2 are sensible "
        "values. It pays at many workers under memory pressure and costs traffic "
        "(docs/simulator.md); on 4 workers with long documents it kept no more hits "
        "(docs/bench.md).",
    )
    spill_hops: int = _f(
        _POLICY.spill_hops,
        "With --tokenlake-spill-margin: a segment handed over this many times since a "
        "request last used it is dropped at its next eviction instead of handed on "
        "(0: no limit). The limit cuts the traffic of data nobody uses, which each "
        "hand-over puts among the receiver's oldest (docs/simulator.md).",
    )
    eviction: str = _f(
        _POLICY.eviction,
        "Order in which a worker evicts its cached segments (always leaves first): lru "
        "(least recently used) or aware (recency plus reuse frequency; docs/simulator.md).",
        choices=("lru", "aware"),
    )
    curve_dir: Optional[str] = _f(
        None,
        "Directory of the pool's CURVE certificates (the allow-list; one per worker, made by "
        "`tokenlake keygen DIR --name W --member HOST:PORT`): brokers then authenticate and "
        "encrypt all traffic, admit only listed keys, and serve a pool message only when its "
        "sender is the member its key names. Required to bind to a non-loopback address.",
    )
    curve_key: Optional[str] = _f(
        None,
        "This worker's secret key: a name in --tokenlake-curve-dir (W for DIR/W.key_secret) "
        "or a path. Default: the secret key in that directory whose certificate names this "
        "worker's broker address.",
    )
    insecure: bool = _f(
        False,
        "Allow binding the broker to a non-loopback --tokenlake-host without "
        "--tokenlake-curve-dir (logged as a warning). Anyone who reaches the port can then "
        "join the pool, read every cached prefix and its KV, and store KV: trusted networks only.",
    )
    max_inflight: int = _f(
        1024, "Requests to other workers in flight at most (back-pressure beyond it)."
    )
    log_interval: float = _f(
        30.0,
        "Seconds between cache statistics lines in the server log (0 turns them off).",
    )
    check_integrity: bool = _f(
        False,
        "Check the slot invariant (free + cached + locked == capacity) after every "
        "eviction and insert. Slow; for debugging.",
    )
    request_log: Optional[str] = _f(
        None,
        "Append one JSON line per finished request to this file: its id (the rid of "
        "SGLang's responses), this worker's broker address, the time, its prompt and cached "
        "tokens, and of the cached ones how many were pulled from or shipped to other "
        "workers (the rest were local). Workers may share one file (a line is one append).",
    )

    def __post_init__(self) -> None:
        if self.segment_size <= 0:
            raise ValueError(
                f"--{FLAG_PREFIX}-segment-size must be positive, got {self.segment_size}"
            )
        if not (0 <= self.port < 65536):
            raise ValueError(f"--{FLAG_PREFIX}-port must be in [0, 65535], got {self.port}")
        if self.remote_mode not in REMOTE_MODES:
            raise ValueError(f"--{FLAG_PREFIX}-remote-mode must be one of "
                             f"{', '.join(REMOTE_MODES)}, got {self.remote_mode!r}")
        for name in ("prefill_cost", "link_rtt", "link_bandwidth"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(
                    f"--{FLAG_PREFIX}-{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        for name in ("heartbeat_interval", "peer_timeout", "pull_timeout", "query_timeout",
                     "lease_ttl"):
            if not getattr(self, name) > 0:  # NaN too
                raise ValueError(
                    f"--{FLAG_PREFIX}-{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.peer_timeout <= self.heartbeat_interval:
            raise ValueError(
                f"--{FLAG_PREFIX}-peer-timeout ({self.peer_timeout}) must exceed "
                f"--{FLAG_PREFIX}-heartbeat-interval ({self.heartbeat_interval})"
            )
        self.peer_list()  # validates the addresses
        if not self.curve_dir and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"--{FLAG_PREFIX}-host {self.host} is reachable from other hosts: set "
                f"--{FLAG_PREFIX}-curve-dir (per-worker CURVE keys, see docs/security.md), or "
                f"--{FLAG_PREFIX}-insecure to serve the pool unauthenticated on a trusted network"
            )
        if self.curve_key and not self.curve_dir:
            raise ValueError(f"--{FLAG_PREFIX}-curve-key needs --{FLAG_PREFIX}-curve-dir")
        if not 0.0 <= self.replica_budget <= 1.0:
            raise ValueError(f"--{FLAG_PREFIX}-replica-budget must be in [0, 1], got {self.replica_budget}")
        if self.hot_window < 16:
            raise ValueError(f"--{FLAG_PREFIX}-hot-window must be at least 16, got {self.hot_window}")
        if self.hot_k < 2:
            raise ValueError(f"--{FLAG_PREFIX}-hot-k must be at least 2, got {self.hot_k}")
        if self.replan_every < 1 or self.placement_choices < 1:
            raise ValueError(
                f"--{FLAG_PREFIX}-replan-every and --{FLAG_PREFIX}-placement-choices must be at least 1"
            )
        if self.max_inflight <= 0:
            raise ValueError(f"--{FLAG_PREFIX}-max-inflight must be positive, got {self.max_inflight}")
        if self.request_log is not None:
            path = self.request_log
            folder = os.path.dirname(os.path.abspath(path)) if path else ""
            if not path or os.path.isdir(path) or not os.path.isdir(folder):
                raise ValueError(f"--{FLAG_PREFIX}-request-log {path!r}: not a file in an "
                                 f"existing folder")
        if self.log_interval < 0:
            raise ValueError(
                f"--{FLAG_PREFIX}-log-interval must be >= 0, got {self.log_interval}"
            )

    # -- CLI ---------------------------------------------------------------

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--tokenlake-*`` flag per field, help and default from the field."""
        group = parser.add_argument_group(
            "TokenLake", "Options of --cache-backend tokenlake (ignored otherwise)."
        )
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f"--{FLAG_PREFIX}-{f.name.replace('_', '-')}"
            dest = f"{FLAG_PREFIX}_{f.name}"
            typ = hints[f.name]
            help_text = f"{f.metadata['help']} (default: {f.default!r})"
            if typ is bool:
                group.add_argument(
                    flag,
                    dest=dest,
                    action=argparse.BooleanOptionalAction,
                    default=f.default,
                    help=help_text,
                )
                continue
            base = _unwrap_optional(typ)
            group.add_argument(flag, dest=dest, type=base, default=f.default, help=help_text,
                               choices=f.metadata.get("choices"))

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> TokenLakeConfig:
        kw = {}
        for f in dataclasses.fields(cls):
            dest = f"{FLAG_PREFIX}_{f.name}"
            if hasattr(args, dest):
                kw[f.name] = getattr(args, dest)
        return cls(**kw)

    def policy(self) -> PolicyConfig:
        """The pool policy's parameters (the record the simulator takes too)."""
        return PolicyConfig(
            replica_budget=self.replica_budget, hot_window=self.hot_window, hot_k=self.hot_k,
            replan_every=self.replan_every, placement_choices=self.placement_choices,
            pool_leaf_first=self.pool_leaf_first, eviction=self.eviction,
            placement=self.placement, spill_margin=self.spill_margin,
            spill_hops=self.spill_hops, remote_mode=self.remote_mode,
        )

    def peer_list(self) -> list[str]:
        out = []
        for p in self.peers.split(","):
            p = p.strip()
            if not p:
                continue
            host, sep, port = p.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--{FLAG_PREFIX}-peers: {p!r} is not HOST:PORT")
            out.append(p)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenLakeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TokenLake settings: {sorted(unknown)}")
        return cls(**d)


def is_loopback(host: str) -> bool:
    """Is ``host`` reachable from this host only (127.0.0.0/8, ::1, localhost)?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name (or a wildcard) other hosts may resolve


def _unwrap_optional(typ: Any) -> Any:
    args = getattr(typ, "__args__", None)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return typ


def markdown_table() -> str:
    """The flags as a markdown table (README); ``python -m sglang_tokenlake.config``."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(TokenLakeConfig):
        flag = f"--{FLAG_PREFIX}-{f.name.replace('_', '-')}"
        if f.type in (bool, "bool"):
            flag += f" / --no-{FLAG_PREFIX}-{f.name.replace('_', '-')}"
        d = f.default
        if d is None:
            default = "unset"
        elif isinstance(d, bool):
            default = "on" if d else "off"
        elif d == "":
            default = "(none)"
        else:
            default = str(d)
        rows.append(f"| `{flag}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
