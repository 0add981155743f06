"""The KV stream: pulls over plain TCP, each reply read by the thread that asked.

On the ZeroMQ path a segment's KV passes through ZeroMQ's I/O thread on both
sides and, for the pool's asynchronous requests, a hand-off to the agent thread;
for a 256 KiB segment on loopback that costs more than the transfer itself
(scripts/bench_transport.py). Bulk requests (``PeerAgent.request(bulk=True)``:
pulls) take a TCP connection per requesting thread and owner instead::

    requester thread ──request──▶ owner's stream thread (one per connection) ──handler──▶ reply
         ▲                                                                               │
         └──── read in result(), into fresh buffers, on the requester's own thread ◀─────┘

A message is the broker's (frames.py) laid end to end: the msgpack header's
length (4 bytes, little-endian), the header, then its buffers back to back,
sized by the header's ``b``. Replies come back in request order; reading one
first reads (and resolves) the replies before it. The owner answers every
request before it reads the next (a handler that does not reply gets an error
reply), so the order holds. A malformed or oversized message closes its
connection: a byte stream cannot skip one. A connection that fails, or times
out in the middle of a reply, is closed and its pending requests fail; the next
request connects again. A request that cannot connect takes the ZeroMQ path.

The stream carries no encryption and no authentication beyond the handlers'
own check that the sender is a live member: the pool opens it only without
CURVE, where the broker has none either.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Optional

import numpy as np

from sglang_tokenlake.transport.broker import Handler, Request
from sglang_tokenlake.transport.frames import (
    MAX_HEADER_BYTES,
    Buffer,
    FrameError,
    Message,
    PeerError,
    decode_header,
    encode,
)
from sglang_tokenlake.transport.threads import name_this_thread

logger = logging.getLogger(__name__)

_PREFIX = struct.Struct("<IQ")  # header bytes, buffer bytes
_ALIGN = 64  # the header is padded to this, so buffers start aligned
STALL_S = 10.0  # a reply that stops this long in the middle fails its connection
CONNECT_TIMEOUT_S = 0.5
RETRY_AFTER_S = 5.0  # after a failed connect, requests to that address take the ZeroMQ path
MAX_REPLY_BYTES = 1 << 30  # buffer bytes of one reply; pulls ask for less at a time


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed")
        got += k


def read_message(sock: socket.socket, known_kinds: Optional[frozenset[str]],
                 max_buffer_bytes: int) -> Message:
    """One message from ``sock`` (its buffers in fresh, writable, aligned memory);
    ``FrameError`` when it breaks the format or its buffers exceed ``max_buffer_bytes``."""
    prefix = bytearray(_PREFIX.size)
    _recv_into(sock, memoryview(prefix))
    n, total = _PREFIX.unpack(prefix)
    if n > MAX_HEADER_BYTES:
        raise FrameError(f"header of {n} bytes exceeds {MAX_HEADER_BYTES}")
    if total > max_buffer_bytes:
        raise FrameError(f"buffers of {total} bytes exceed {max_buffer_bytes}")
    at = _padded(n)
    body = memoryview(np.empty(at + total, dtype=np.uint8))  # not zeroed: all read into
    _recv_into(sock, body)
    kind, req_id, h, sizes = decode_header(bytes(body[:n]), known_kinds)
    if sum(sizes) != total:
        raise FrameError(f"header lists {sum(sizes)} buffer bytes, prefix says {total}")
    buffers = []
    for size in sizes:
        buffers.append(body[at : at + size])
        at += size
    return Message(kind, req_id, h, buffers)


def send_message(sock: socket.socket, frames: Sequence[Buffer]) -> int:
    """Write one message (``frames.encode``'s frames) to ``sock``; the bytes written."""
    header = bytes(frames[0])
    n = len(header)
    if len(frames) == 1:  # a request: one small write
        sock.sendall(b"".join((_PREFIX.pack(n, 0), header, bytes(_padded(n) - n))))
        return _PREFIX.size + _padded(n)
    parts = [memoryview(f).cast("B") for f in frames[1:]]
    parts[:0] = [memoryview(b"".join((_PREFIX.pack(n, sum(p.nbytes for p in parts)), header,
                                      bytes(_padded(n) - n))))]
    total = sum(p.nbytes for p in parts)
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= parts[0].nbytes:
            sent -= parts[0].nbytes
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]
    return total


# -- the owner's side -----------------------------------------------------------------


class _Connection:
    """One accepted connection; ``Request.reply`` writes to it (any thread, once each)."""

    def __init__(self, sock: socket.socket, server: StreamServer) -> None:
        self.sock = sock
        self.server = server
        self.lock = threading.Lock()
        self.replied = 0

    def _send_from_any_thread(self, peer: bytes, frames: list[Buffer]) -> None:
        with self.lock:
            send_message(self.sock, frames)
            self.replied += 1
        self.server.counters["replies"] += 1


class StreamServer:
    """Serve ``handlers`` on a TCP port of ``host`` (port 0: any free one).

    ``max_buffer_bytes``: the most buffer bytes one request may carry (a pull carries
    none). Each connection is served by its own thread, one request at a time.
    """

    def __init__(self, host: str, handlers: dict[str, Handler], *, port: int = 0,
                 max_buffer_bytes: int = 0, name: str = "tokenlake-stream") -> None:
        self.host, self.port = host, port
        self.handlers = dict(handlers)
        self.known_kinds = frozenset(self.handlers)
        self.max_buffer_bytes = max_buffer_bytes
        self.name = name
        self.counters = {"connections": 0, "received": 0, "malformed": 0, "handler_errors": 0,
                         "replies": 0, "unanswered": 0}
        self._listener: Optional[socket.socket] = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> int:
        """Bind and serve; the port bound."""
        lst = socket.create_server((self.host, self.port), reuse_port=False)
        self._listener = lst
        self.port = lst.getsockname()[1]
        threading.Thread(target=self._accept, name=self.name, daemon=True).start()
        return self.port

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            _close(self._listener)
        with self._lock:
            for c in list(self._conns):
                _close(c)
            self._conns.clear()

    def _accept(self) -> None:
        name_this_thread("kv-accept")
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stop.is_set():
                    _close(sock)
                    return
                self._conns.add(sock)
            self.counters["connections"] += 1
            threading.Thread(target=self._serve, args=(sock,), name=f"{self.name}-conn",
                             daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        name_this_thread("kv-serve")
        conn = _Connection(sock, self)
        try:
            while not self._stop.is_set():
                try:
                    msg = read_message(sock, self.known_kinds, self.max_buffer_bytes)
                except FrameError as e:
                    self.counters["malformed"] += 1
                    logger.warning("%s: closing a connection that sent a malformed message: %s",
                                   self.name, e)
                    return
                self.counters["received"] += 1
                before = conn.replied
                req = Request(msg, b"", conn)  # type: ignore[arg-type]  # replies go to conn
                try:
                    self.handlers[msg.kind](req)
                except Exception:
                    self.counters["handler_errors"] += 1
                    logger.exception("%s: handler for %r failed", self.name, msg.kind)
                if conn.replied == before:  # replies keep request order: answer every request
                    self.counters["unanswered"] += 1
                    if not req._done:
                        req.error(f"{msg.kind}: no answer")
                    else:  # answered later from another thread: out of order, so close
                        return
        except OSError:  # closed by the peer, or a reset
            return
        finally:
            with self._lock:
                self._conns.discard(sock)
            _close(sock)


def _readable(sock: socket.socket, timeout: float) -> bool:
    try:
        return bool(select.select([sock], [], [], timeout)[0])
    except (OSError, ValueError):  # closed
        return True  # the read that follows fails and says why


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# -- the requester's side ------------------------------------------------------------------


class ReadOnWaitFuture(Future):
    """A reply its requesting thread receives itself: ``result()`` and ``exception()``
    first let ``lane.wait`` read that thread's connections until it is there (or its
    timeout passes). The peer agent's direct requests and bulk requests both are one."""

    def __init__(self, lane: Any, req_id: int, deadline: float) -> None:
        super().__init__()
        self.lane = lane
        self.req_id = req_id
        self.deadline = deadline

    def result(self, timeout: Optional[float] = None) -> Any:
        if not self.done():
            self.lane.wait(self, timeout)
        return super().result(0)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if not self.done():
            self.lane.wait(self, timeout)
        return super().exception(0)


class StreamFuture(ReadOnWaitFuture):
    """The reply to a bulk request: read from its connection, in request order.

    ``waited``: the reply was not yet there when its reader began (so the time it was
    resolved is the time it arrived: a fair sample of the link's speed)."""

    def __init__(self, link: _Link, req_id: int, deadline: float) -> None:
        super().__init__(link.lane, req_id, deadline)
        self.link = link
        self.waited = False


class _Link:
    """One connection from a requesting thread to one owner's stream server."""

    def __init__(self, lane: StreamLane, peer: str, address: tuple[str, int],
                 sock: socket.socket) -> None:
        self.lane, self.peer, self.address, self.sock = lane, peer, address, sock
        self.pending: deque[StreamFuture] = deque()
        self.closed = False

    def fail(self, exc: BaseException) -> None:
        """Close the connection; every request waiting on it fails with ``exc``."""
        if not self.closed:
            self.closed = True
            _close(self.sock)
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)


class StreamLane:
    """One thread's stream connections, one per owner. Only that thread touches it.

    ``counters``: the agent's counters (``stream_*``); ``ids``: its request ids.
    """

    def __init__(self, counters: dict[str, int], ids: Iterator[int],
                 max_buffer_bytes: int) -> None:
        self.thread = threading.get_ident()
        self.counters = counters
        self.ids = ids
        self.max_buffer_bytes = max_buffer_bytes
        self.links: dict[str, _Link] = {}
        self.retry_at: dict[tuple[str, int], float] = {}

    def send(self, peer: str, address: tuple[str, int], kind: str,
             header: Optional[dict[str, Any]], buffers: Sequence[Buffer],
             timeout: float) -> Optional[StreamFuture]:
        """The request sent on this thread's connection to ``address``; None when it
        cannot connect (the caller takes the ZeroMQ path)."""
        link = self.links.get(peer)
        if link is not None and (link.closed or link.address != address):
            link.fail(ConnectionError(f"{peer} moved to another stream port"))
            del self.links[peer]
            link = None
        if link is None:
            link = self._connect(peer, address)
            if link is None:
                return None
        req_id = next(self.ids)
        try:
            n = send_message(link.sock, encode(kind, req_id, header, buffers))
        except OSError as e:
            self.counters["stream_errors"] += 1
            link.fail(ConnectionError(f"stream to {peer} failed: {e}"))
            del self.links[peer]
            return None
        fut = StreamFuture(link, req_id, time.monotonic() + timeout)
        link.pending.append(fut)
        self.counters["stream_sent"] += 1
        self.counters["stream_bytes_sent"] += n
        return fut

    def _connect(self, peer: str, address: tuple[str, int]) -> Optional[_Link]:
        if time.monotonic() < self.retry_at.get(address, 0.0):
            return None
        try:
            sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            self.counters["stream_connect_failures"] += 1
            self.retry_at[address] = time.monotonic() + RETRY_AFTER_S
            logger.info("stream to %s at %s:%d: %s; using ZeroMQ for %.0f s", peer, *address, e,
                        RETRY_AFTER_S)
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)  # blocking: the deadline is kept by select before each reply
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(STALL_S), 0))
        self.counters["stream_connects"] += 1
        link = self.links[peer] = _Link(self, peer, address, sock)
        return link

    def wait(self, fut: StreamFuture, timeout: Optional[float]) -> None:
        """Read ``fut``'s connection until ``fut`` is done or ``timeout`` passes."""
        if threading.get_ident() != self.thread:
            raise RuntimeError("a bulk request's reply is received by the thread that sent it")
        link = fut.link
        give_up = time.monotonic() + timeout if timeout is not None else float("inf")
        ready = not link.closed and _readable(link.sock, 0)
        if link.pending and link.pending[0] is fut:
            fut.waited = not ready
        while not fut.done():
            left = min(give_up, fut.deadline) - time.monotonic()
            if not ready and left > 0:
                ready = _readable(link.sock, left)
            if not ready:  # a message is read only once it has begun to arrive
                if time.monotonic() >= fut.deadline:
                    self.counters["stream_timeouts"] += 1
                    link.fail(TimeoutError(f"no reply from {link.peer}"))
                    self.links.pop(link.peer, None)
                return  # else the caller's own timeout: Future.result(0) raises
            ready = False
            try:  # blocking; a reply that stalls midway fails after STALL_S (SO_RCVTIMEO)
                msg = read_message(link.sock, None, self.max_buffer_bytes)
            except (OSError, FrameError) as e:
                self.counters["stream_errors"] += 1
                link.fail(ConnectionError(f"stream from {link.peer} failed: {e}"))
                self.links.pop(link.peer, None)
                return
            self._deliver(link, msg)

    def _deliver(self, link: _Link, msg: Message) -> None:
        if not link.pending or link.pending[0].req_id != msg.id:
            self.counters["stream_errors"] += 1
            link.fail(ConnectionError(f"{link.peer} answered out of order"))
            self.links.pop(link.peer, None)
            return
        fut = link.pending.popleft()
        self.counters["stream_replies"] += 1
        self.counters["stream_bytes_received"] += sum(b.nbytes for b in msg.buffers)
        if fut.done():  # given up on by its caller
            return
        if msg.kind == "error":
            fut.set_exception(PeerError(str(msg.header.get("reason", "error"))))
        else:
            fut.set_result(msg)

    def close(self) -> None:
        for link in self.links.values():
            link.fail(ConnectionError("peer agent stopped"))
        self.links.clear()


STREAM_COUNTERS = ("stream_sent", "stream_replies", "stream_bytes_sent", "stream_bytes_received",
                   "stream_errors", "stream_timeouts", "stream_connects", "stream_connect_failures")
