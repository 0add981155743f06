"""A worker's broker: a ZeroMQ ROUTER socket served by one background thread.

::

    peers ──DEALER──▶ ROUTER ──▶ broker thread ──handler(Request)──▶ (reply now, or
                        ▲                                           queue work for the
                        └──── inproc PULL ◀── PUSH (any thread) ◀── scheduler thread)

Incoming messages are validated (``frames.decode``) before a handler runs;
malformed ones are counted, logged (rate-limited) and dropped, and the broker
keeps serving. A frame larger than ``max_frame_bytes`` (ZeroMQ ``MAXMSGSIZE``)
is never buffered: ZeroMQ drops the sender's connection. A handler gets a ``Request`` whose ``reply`` may be called from
any thread, once: replies travel to the broker thread through an inproc
socket, because ZeroMQ sockets must not be shared between threads.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import zmq

from sglang_tokenlake.transport.frames import (
    MAX_HEADER_BYTES,
    Buffer,
    FrameError,
    Message,
    decode,
    encode,
)
from sglang_tokenlake.transport.threads import name_this_thread

logger = logging.getLogger(__name__)

Handler = Callable[["Request"], None]
# Frames of a broker without KV traffic: headers only. A pool's broker is given the
# size of its largest legitimate frame (``pool.limits.max_frame_bytes``).
DEFAULT_MAX_FRAME_BYTES = MAX_HEADER_BYTES + 4096
_ids = itertools.count()


class Request:
    """One received message and the way back to its sender.

    ``user``: the public key (z85) that authenticated the connection, as ZAP
    reported it; None on a broker without CURVE.
    """

    __slots__ = ("msg", "peer", "user", "_broker", "_done")

    def __init__(self, msg: Message, peer: bytes, broker: Broker,
                 user: Optional[str] = None) -> None:
        self.msg = msg
        self.peer = peer
        self.user = user
        self._broker = broker
        self._done = False

    def reply(self, kind: str, header: Optional[dict[str, Any]] = None,
              buffers: Sequence[Buffer] = ()) -> None:
        if self._done:
            raise RuntimeError("a request is answered once")
        self._done = True
        self._broker._send_from_any_thread(self.peer, encode(kind, self.msg.id, header, buffers))

    def error(self, reason: str, **extra: Any) -> None:
        self.reply("error", {"reason": reason, **extra})


class Broker:
    """Serve handlers on ``tcp://host:port`` (or any ZeroMQ endpoint)."""

    def __init__(
        self,
        endpoint: str,
        handlers: dict[str, Handler],
        *,
        context: Optional[zmq.Context] = None,
        curve_secret_key: Optional[bytes] = None,
        curve_public_key: Optional[bytes] = None,
        authenticator: Optional[Any] = None,
        rcv_hwm: int = 4096,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        name: str = "tokenlake-broker",
    ) -> None:
        self.endpoint = endpoint
        self.handlers = dict(handlers)
        self.known_kinds = frozenset(self.handlers)
        self.ctx = context or zmq.Context.instance()
        self.name = name
        self._curve = (curve_public_key, curve_secret_key) if curve_secret_key else None
        self._authenticator = authenticator
        self._rcv_hwm = rcv_hwm
        self.max_frame_bytes = max_frame_bytes
        self._inproc = f"inproc://tokenlake-outbox-{id(self)}-{next(_ids)}"
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket] = []
        self._push_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._start_error: Optional[BaseException] = None
        self.bound_endpoint: Optional[str] = None
        self._ident: Optional[int] = None
        self._router: Any = None
        self.counters = {"received": 0, "malformed": 0, "handler_errors": 0, "replies": 0}
        self._last_malformed_log = 0.0

    # -- life cycle -------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> str:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.name} did not start within {timeout}s")
        if self._start_error is not None:
            raise self._start_error
        assert self.bound_endpoint is not None
        return self.bound_endpoint

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._push_lock:
            for s in self._push_sockets:
                s.close(linger=0)
            self._push_sockets.clear()

    # -- sending from any thread -------------------------------------------------

    def _send_from_any_thread(self, peer: bytes, frames: list[Buffer]) -> None:
        if threading.get_ident() == self._ident:
            # Answered inside a handler: the broker thread owns the router socket.
            self._router.send_multipart([peer, *frames], copy=False)
            self.counters["replies"] += 1
            return
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self._inproc)
            self._local.push = sock
            with self._push_lock:
                self._push_sockets.append(sock)
        sock.send_multipart([peer, *frames], copy=False)

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        name_this_thread("broker")
        try:
            router = self.ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.RCVHWM, self._rcv_hwm)
            router.setsockopt(zmq.ROUTER_MANDATORY, 0)
            router.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
            if self._curve is not None:
                router.curve_server = True
                router.curve_publickey, router.curve_secretkey = self._curve
            router.bind(self.endpoint)
            self.bound_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            outbox = self.ctx.socket(zmq.PULL)
            outbox.setsockopt(zmq.LINGER, 0)
            outbox.bind(self._inproc)
            self._router = router
            self._ident = threading.get_ident()
        except BaseException as e:  # surface bind errors to start()
            self._start_error = e
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                # One message per ready socket per wake-up: a non-blocking receive that
                # finds the queue empty costs more than the next poll (measured by
                # scripts/bench_transport.py), and the poll is needed to sleep anyway.
                if outbox in events:
                    router.send_multipart(outbox.recv_multipart(copy=False), copy=False)
                    self.counters["replies"] += 1
                if router in events:
                    self._dispatch(router.recv_multipart(copy=False))
        finally:
            router.close(linger=0)
            outbox.close(linger=0)

    def _dispatch(self, frames: list[Any]) -> None:
        self.counters["received"] += 1
        if len(frames) < 2:
            self._malformed("no identity/header")
            return
        peer = frames[0].bytes
        try:
            msg = decode(frames[1:], self.known_kinds)
        except FrameError as e:
            self._malformed(str(e))
            return
        user = None
        if self._curve is not None:
            try:
                user = frames[1].get("User-Id") or None
            except zmq.ZMQError:
                user = None
        try:
            self.handlers[msg.kind](Request(msg, peer, self, user))
        except Exception:
            self.counters["handler_errors"] += 1
            logger.exception("%s: handler for %r failed", self.name, msg.kind)

    def _malformed(self, why: str) -> None:
        self.counters["malformed"] += 1
        now = time.monotonic()
        if now - self._last_malformed_log > 5.0:
            self._last_malformed_log = now
            logger.warning(
                "%s: dropped a malformed message (%s); %d malformed so far",
                self.name, why, self.counters["malformed"],
            )
