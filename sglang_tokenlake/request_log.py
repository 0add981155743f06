"""One JSON line per finished request (``--tokenlake-request-log``).

Where a request ran and how its cached prefix was served, for an operator tracing a
request and for comparing a run request by request with the simulator's replay
(``sim.live``). Each line is one ``write`` on a file opened for appending, so several
workers may share a file. Plain Python.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

logger = logging.getLogger(__name__)


class RequestLog:
    """Appends request records to ``path`` (created if missing; its folder must exist)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, rid: str, worker: Optional[str], prompt_tokens: int, cached_tokens: int,
              served: Optional[tuple[int, int]] = None) -> None:
        """``served``: of ``cached_tokens``, those pulled from and those shipped to other
        workers (None: all local). A failed write is logged once and ends the log; it
        never fails the request."""
        if self._fd is None:
            return
        pulled, shipped = served or (0, 0)
        line = json.dumps({"rid": rid, "worker": worker, "t": round(time.time(), 4),
                           "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
                           "pulled_tokens": pulled, "shipped_tokens": shipped},
                          separators=(",", ":")) + "\n"
        try:
            os.write(self._fd, line.encode())
        except OSError as e:
            logger.warning("TokenLake: request log %s stopped: %s", self.path, e)
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read(path: str) -> list[dict]:
    """The records of a request log (a torn last line, from a worker stopped mid-write,
    is left out)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
