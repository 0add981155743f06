"""A request/response client of a broker (one DEALER socket, one thread).

Replies are matched to requests by id; a reply that arrives after its request
timed out is discarded. A timeout raises ``TimeoutError`` and leaves the
client usable.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import zmq

from sglang_tokenlake.transport.frames import Buffer, FrameError, Message, decode, encode

if TYPE_CHECKING:
    from sglang_tokenlake.transport.auth import CurveKeys


class RemoteError(RuntimeError):
    """The broker answered with an ``error`` message."""


class Client:
    def __init__(
        self,
        endpoint: str,
        *,
        context: Optional[zmq.Context] = None,
        curve: Optional[CurveKeys] = None,
    ) -> None:
        self.endpoint = endpoint
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            server = curve.server_key(endpoint)
            if server is None:
                self.sock.close(linger=0)
                raise ValueError(f"no certificate for the broker {endpoint} in {curve.directory} "
                                 "(its worker's .key file, naming it as member)")
            self.sock.curve_serverkey = server
            self.sock.curve_publickey = curve.public
            self.sock.curve_secretkey = curve.secret
        self.sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._timeouts: dict[int, int] = {}

    def request(
        self,
        kind: str,
        header: Optional[dict[str, Any]] = None,
        buffers: Sequence[Buffer] = (),
        *,
        timeout: float = 5.0,
    ) -> Message:
        req_id = next(self._ids)
        deadline = time.monotonic() + timeout
        # A send waits for a connected peer; a failed handshake (e.g. CURVE keys
        # the broker refuses) means none ever comes, so bound the send as well.
        self._set_timeout(zmq.SNDTIMEO, timeout)
        try:
            frames = encode(kind, req_id, header, buffers)
            # Small messages are cheaper to copy than to track for zero-copy.
            self.sock.send_multipart(frames, copy=sum(memoryview(f).nbytes for f in frames) < 65536)
        except zmq.Again:
            raise TimeoutError(f"could not send {kind!r} to {self.endpoint} within {timeout}s") from None
        while True:
            # A blocking receive bounded by RCVTIMEO: cheaper than polling first.
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {kind!r} from {self.endpoint} within {timeout}s")
            self._set_timeout(zmq.RCVTIMEO, left)
            try:
                frames = self.sock.recv_multipart(copy=False)
            except zmq.Again:
                continue  # the deadline check above raises
            try:
                msg = decode(frames)
            except FrameError:
                continue  # not ours to interpret; keep waiting for our reply
            if msg.id != req_id:
                continue  # a late reply to an earlier, timed-out request
            if msg.kind == "error":
                raise RemoteError(str(msg.header.get("reason", "unknown error")))
            return msg

    def _set_timeout(self, option: int, seconds: float) -> None:
        """Set a socket timeout, skipping the call when it is unchanged (in whole ms)."""
        ms = max(1, int(seconds * 1000))
        if self._timeouts.get(option) != ms:
            self.sock.setsockopt(option, ms)
            self._timeouts[option] = ms

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
