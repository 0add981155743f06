"""The one configuration record of TokenLake; its CLI flags are generated from it.

Every field becomes ``--tokenlake-<name-with-dashes>`` on ``python -m
sglang.launch_server`` (see ``sglang_tokenlake.sglang.plugin``); the help text is
the field's ``help`` metadata, the default is the field's default.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, get_type_hints

FLAG_PREFIX = "tokenlake"


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
        "one namespace. Default: the served model path.",
    )
    verify_tokens: bool = _f(
        True,
        "Compare the stored token ids of every local segment on a match, so a 64-bit "
        "key collision can never serve the wrong KV.",
    )
    host: str = _f(
        "127.0.0.1",
        "Address this worker's TokenLake broker binds to (status queries; pool "
        "traffic). Loopback by default; set a routable address to pool across hosts.",
    )
    port: int = _f(
        0,
        "Port of this worker's TokenLake broker. 0 picks --port + 1000.",
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

    def __post_init__(self) -> None:
        if self.segment_size <= 0:
            raise ValueError(
                f"--{FLAG_PREFIX}-segment-size must be positive, got {self.segment_size}"
            )
        if not (0 <= self.port < 65536):
            raise ValueError(f"--{FLAG_PREFIX}-port must be in [0, 65535], got {self.port}")
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
            group.add_argument(flag, dest=dest, type=base, default=f.default, help=help_text)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> TokenLakeConfig:
        kw = {}
        for f in dataclasses.fields(cls):
            dest = f"{FLAG_PREFIX}_{f.name}"
            if hasattr(args, dest):
                kw[f.name] = getattr(args, dest)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenLakeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TokenLake settings: {sorted(unknown)}")
        return cls(**d)


def _unwrap_optional(typ: Any) -> Any:
    args = getattr(typ, "__args__", None)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return typ
