"""Who may speak for which member: a message's ``from`` bound to its CURVE key.

With CURVE every connection to a broker is authenticated by one public key
(``Request.user``), and the pool's key directory names the member (``HOST:PORT``)
each key speaks for (transport/auth.py). Every pool operation (hello,
announce, evicted, sync, get, put, lease, unlease, attend) is served only when
its ``from`` is the member its key speaks for: a member cannot act as another,
a status-only key cannot act as any, and a member whose key the directory does
not hold cannot join. Without CURVE (loopback, or ``--tokenlake-insecure``)
nothing is checked: whoever reaches the broker is trusted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Optional

from sglang_tokenlake.counters import Counters
from sglang_tokenlake.segments import keys_from_bytes
from sglang_tokenlake.transport.auth import CurveKeys

logger = logging.getLogger(__name__)

Handler = Callable[[Any], None]


class Identities:
    """The member bindings of one worker's pool (``keys`` None: no CURVE, no checks)."""

    def __init__(self, keys: Optional[CurveKeys], counters: Counters) -> None:
        self.keys = keys
        self.counters = counters
        self._last_log = 0.0

    @property
    def enforced(self) -> bool:
        return self.keys is not None

    def speaks_for(self, req: Any) -> bool:
        """Is the request's ``from`` the member its connection's key speaks for?

        Refuses (error reply, counted, logged at most every 5 s) when not.
        """
        if self.keys is None:
            return True
        claimed = req.msg.header.get("from")
        bound = self.keys.member_of(getattr(req, "user", None))
        if bound is not None and claimed == bound:
            return True
        self.counters.add("refused_identity")
        now = time.monotonic()
        if now - self._last_log > 5.0:
            self._last_log = now
            logger.warning("TokenLake: refused %r claiming to be %r: its key speaks for %r "
                           "(%d refused so far)", req.msg.kind, claimed, bound,
                           self.counters["refused_identity"])
        req.error(f"{req.msg.kind}: 'from' {claimed!r} is not the member this connection's "
                  "key speaks for")
        return False

    def guard(self, handlers: dict[str, Handler]) -> dict[str, Handler]:
        """``handlers``, each served only when ``speaks_for`` holds."""
        if self.keys is None:
            return dict(handlers)
        return {kind: self._guarded(h) for kind, h in handlers.items()}

    def _guarded(self, handler: Handler) -> Handler:
        def serve(req: Any) -> None:
            if self.speaks_for(req):
                handler(req)

        return serve

    def may_join(self, member: str) -> bool:
        """May ``member`` (learned from a heartbeat) become a peer? With CURVE only
        members the key directory names can: others could not pass the handshake."""
        return self.keys is None or self.keys.server_key(member) is not None


def put_key_mismatch(keys: list[int], segs: list[int], tokens: list[bytes],
                     segment_size: int, seed: Any = None) -> Optional[int]:
    """The first segment of a ``put`` whose key is not the chained hash of its tokens.

    Segment ``i``'s key must equal ``H(tokens_i; keys[i-1])`` (segments.py), the
    parent key taken from the put's own chain. Segment 0's parent is the
    request's namespace seed: checked when the put carries it (``seed``), else
    (None) accepted as it is. Returns None when every checked segment agrees.
    """
    for i, tok in zip(segs, tokens):
        parent = keys[i - 1] if i > 0 else seed
        if parent is None:
            continue
        if not isinstance(parent, int) or not 0 <= parent < 1 << 64:
            return i
        if keys_from_bytes(tok, segment_size, parent)[0] != keys[i]:
            return i
    return None
