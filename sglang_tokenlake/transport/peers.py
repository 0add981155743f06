"""The peer agent: one background thread that talks to the other workers' brokers.

::

    any thread ──request(peer, kind, ...)──▶ outbox ──wake──▶ agent thread ──DEALER──▶ peer broker
         ▲                                                      │
         └──────────── Future resolved with the reply ◀─────────┘

Each peer gets a DEALER socket; replies are matched to requests by id and by
the socket they came back on (a peer cannot answer a request sent to another
peer), and resolve a ``concurrent.futures.Future``. With CURVE a socket is
opened only to a peer whose public key the pool's key directory holds. A request that gets no reply within
its timeout fails with ``TimeoutError``; a late reply is dropped. The number of
requests in flight is bounded (``max_inflight``): beyond it ``request`` fails
at once with ``BackPressure`` instead of queueing without limit. Every
``heartbeat_interval`` seconds ``on_tick`` runs in the agent thread.

A thread that will wait for its reply itself (a forward pass shipping one
layer's queries) asks with ``direct=True``: the request leaves on that thread's
own socket to the peer, and ``result()`` on the same thread reads the reply from
it, with no hand-off to the agent thread either way::

    caller thread ──DEALER (its own, per peer)──▶ peer broker ──▶ back to that socket

Until that socket has connected (or when it cannot exist: no CURVE key) a direct
request takes the agent's path. A ``bulk`` request (a pull) goes, like a direct
one, from and back to its own thread, over the peer's KV stream (stream.py) when
the peer announced one (``set_stream``) and the pool has no CURVE.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Optional

import zmq

from sglang_tokenlake.transport.frames import Buffer, FrameError, Message, PeerError, decode, encode
from sglang_tokenlake.transport.stream import STREAM_COUNTERS, ReadOnWaitFuture, StreamLane
from sglang_tokenlake.transport.threads import name_this_thread
from sglang_tokenlake.transport.wake import Waker

if TYPE_CHECKING:
    from sglang_tokenlake.transport.auth import CurveKeys

logger = logging.getLogger(__name__)


class BackPressure(RuntimeError):
    """Too many requests in flight; the caller should fall back (e.g. recompute)."""


class PeerAgent:
    def __init__(
        self,
        *,
        context: Optional[zmq.Context] = None,
        curve: Optional[CurveKeys] = None,  # from auth.load_curve_keys
        heartbeat_interval: float = 0.5,
        on_tick: Optional[Callable[[], None]] = None,
        max_inflight: int = 1024,
        name: str = "tokenlake-peers",
        max_stream_bytes: int = 1 << 30,
    ) -> None:
        self.ctx = context or zmq.Context.instance()
        self.curve, self.heartbeat_interval, self.on_tick = curve, heartbeat_interval, on_tick
        self.max_inflight, self.name = max_inflight, name
        self._ids = itertools.count(1)
        self._outbox: deque = deque()
        # Its PULL socket moves to the agent thread, which alone polls it.
        self._waker = Waker(self.ctx)
        self._sockets: dict[str, zmq.Socket] = {}
        self._endpoints: dict[str, str] = {}
        self._generation: dict[str, int] = {}  # bumped by connect/disconnect: direct sockets renew
        self._lanes = threading.local()
        self._lane_sockets: list[zmq.Socket] = []
        self._lane_lock = threading.Lock()
        self._stream_ports: dict[str, int] = {}  # peer -> its KV stream's port
        self._stream_lanes: list[StreamLane] = []
        self.max_stream_bytes = max_stream_bytes
        self._by_socket: dict[zmq.Socket, str] = {}
        self._pending: dict[int, tuple[Future, float, str]] = {}
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.counters = {"sent": 0, "replies": 0, "timeouts": 0, "errors": 0, "bytes_sent": 0,
                         "bytes_received": 0, "rejected_backpressure": 0,
                         "replies_wrong_peer": 0, "refused_no_key": 0,
                         # Direct requests' own counters: only their threads write them.
                         "direct_sent": 0, "direct_replies": 0, "direct_timeouts": 0,
                         "direct_bytes_sent": 0, "direct_bytes_received": 0, "direct_errors": 0,
                         "direct_replies_wrong_peer": 0, **dict.fromkeys(STREAM_COUNTERS, 0)}

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def close(self) -> None:
        self._stop.set()
        self._waker.wake()
        if self._thread is None:
            self._waker.close()  # never started; else the agent thread closes it on its way out
        else:
            self._thread.join(5)
        with self._lane_lock:
            for sock in self._lane_sockets:
                sock.close(linger=0)
            self._lane_sockets.clear()
            for lane in self._stream_lanes:
                lane.close()

    # -- API (any thread) --------------------------------------------------------

    def connect(self, peer: str, endpoint: str) -> None:
        self._endpoints[peer] = endpoint
        self._generation[peer] = self._generation.get(peer, 0) + 1
        self._outbox.append(("connect", peer, endpoint))
        self._waker.wake()

    def disconnect(self, peer: str) -> None:
        self._endpoints.pop(peer, None)
        self._generation[peer] = self._generation.get(peer, 0) + 1
        self._outbox.append(("disconnect", peer, None))
        self._waker.wake()

    def set_stream(self, peer: str, port: Optional[int]) -> None:
        """``peer`` serves bulk requests on ``port`` of its host (None: no longer)."""
        if port is None:
            self._stream_ports.pop(peer, None)
        else:
            self._stream_ports[peer] = port

    def request(
        self,
        peer: str,
        kind: str,
        header: Optional[dict[str, Any]] = None,
        buffers: Sequence[Buffer] = (),
        *,
        timeout: float = 5.0,
        direct: bool = False,
        bulk: bool = False,
    ) -> Future:
        """Send a request; its future resolves with the reply. ``direct`` and ``bulk``: the
        calling thread receives the reply itself, in ``result()`` (see the module docstring)."""
        port = self._stream_ports.get(peer) if bulk and self.curve is None else None
        if port is not None and not self._stop.is_set():
            host = self._endpoints.get(peer, "").rpartition("://")[2].rpartition(":")[0].strip("[]")
            got = (self._stream_lane().send(peer, (host, port), kind, header, buffers, timeout)
                   if host else None)
            if got is not None:
                return got
        if direct and not self._stop.is_set():
            got = self._lane().send(peer, kind, header, buffers, timeout)
            if got is not None:
                return got
        fut: Future = Future()
        with self._inflight_lock:
            if self._inflight >= self.max_inflight:
                self.counters["rejected_backpressure"] += 1
                fut.set_exception(BackPressure(f"{self._inflight} requests in flight"))
                return fut
            self._inflight += 1
        req_id = next(self._ids)
        frames = encode(kind, req_id, header, buffers)
        self._outbox.append(("send", peer, (req_id, frames, fut, time.monotonic() + timeout)))
        self._waker.wake()
        return fut

    # -- internals ------------------------------------------------------------------

    def _finish(self, req_id: int, result: Any = None, exc: Optional[BaseException] = None) -> None:
        entry = self._pending.pop(req_id, None)
        if entry is None:
            return
        fut = entry[0]
        with self._inflight_lock:
            self._inflight -= 1
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def _lane(self) -> _Lane:
        lane = getattr(self._lanes, "lane", None)
        if lane is None:
            lane = self._lanes.lane = _Lane(self)
        return lane

    def _stream_lane(self) -> StreamLane:
        lane = getattr(self._lanes, "stream", None)
        if lane is None:
            lane = self._lanes.stream = StreamLane(self.counters, self._ids, self.max_stream_bytes)
            with self._lane_lock:
                self._stream_lanes.append(lane)
        return lane

    def _open(self, peer: str, endpoint: str) -> None:
        if peer in self._sockets:
            return
        s = self._new_socket(peer, endpoint)
        if s is None:
            return
        self._sockets[peer] = s
        self._by_socket[s] = peer
        self._poller.register(s, zmq.POLLIN)

    def _new_socket(self, peer: str, endpoint: str) -> Optional[zmq.Socket]:
        """A DEALER connected to ``peer`` (None without its CURVE key)."""
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.setsockopt(zmq.RCVHWM, 1000)
        s.setsockopt(zmq.IMMEDIATE, 1)  # do not queue for a peer that is not connected
        if self.curve is not None:
            server_pub = self.curve.server_key(peer)
            if server_pub is None:
                s.close(linger=0)
                self.counters["refused_no_key"] += 1
                logger.warning("%s: no key for %s in %s: not connecting to it", self.name, peer,
                               self.curve.directory)
                return None
            s.curve_serverkey = server_pub
            s.curve_publickey, s.curve_secretkey = self.curve.public, self.curve.secret
        s.connect(endpoint if "://" in endpoint else f"tcp://{endpoint}")
        return s

    def _close(self, peer: str) -> None:
        s = self._sockets.pop(peer, None)
        if s is None:
            return
        self._by_socket.pop(s, None)
        self._poller.unregister(s)
        s.close(linger=0)
        for req_id, (_, _, p) in list(self._pending.items()):
            if p == peer:
                self._finish(req_id, exc=ConnectionError(f"peer {peer} disconnected"))

    def _run(self) -> None:
        name_this_thread("peers")
        wake = self._waker.socket
        self._poller = zmq.Poller()
        self._poller.register(wake, zmq.POLLIN)
        self._ready.set()
        next_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.heartbeat_interval
                    if self.on_tick is not None:
                        try:
                            self.on_tick()
                        except Exception:
                            logger.exception("%s: tick failed", self.name)
                    self._expire(now)
                timeout_ms = max(1, int(1000 * (next_tick - time.monotonic())))
                events = dict(self._poller.poll(timeout_ms))
                if wake in events:
                    self._waker.drain()
                self._drain_outbox()
                for sock in events:
                    if sock is wake:
                        continue
                    self._receive(sock)
        finally:
            for peer in list(self._sockets):
                self._close(peer)
            for req_id in list(self._pending):
                self._finish(req_id, exc=ConnectionError("peer agent stopped"))
            self._waker.close()

    def _drain_outbox(self) -> None:
        while self._outbox:
            op, peer, arg = self._outbox.popleft()
            if op == "send":
                req_id, _, fut, deadline = arg
                self._pending[req_id] = (fut, deadline, peer)
            try:
                self._do(op, peer, arg)
            except Exception as e:  # one bad operation must not stop the agent
                logger.exception("%s: %s %s failed", self.name, op, peer)
                if op == "send":
                    self._finish(arg[0], exc=ConnectionError(f"send to {peer} failed: {e}"))

    def _do(self, op: str, peer: str, arg: Any) -> None:
        if op == "connect":
            self._open(peer, arg)
            return
        if op == "disconnect":
            self._close(peer)
            return
        req_id, frames = arg[0], arg[1]
        sock = self._sockets.get(peer)
        if sock is None:
            self._finish(req_id, exc=ConnectionError(f"unknown peer {peer}"))
            return
        try:
            sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._finish(req_id, exc=ConnectionError(f"peer {peer} is not connected"))
            return
        self.counters["sent"] += 1
        self.counters["bytes_sent"] += sum(memoryview(f).nbytes for f in frames)

    def _receive(self, sock: zmq.Socket) -> None:
        """One reply per ready socket per wake-up (the poll said one is there): a
        non-blocking receive that finds the queue empty costs more than the next poll."""
        def sent_to(req_id: int) -> Optional[str]:
            entry = self._pending.get(req_id)
            return entry[2] if entry is not None else None

        msg = _take_reply(sock, self._by_socket.get(sock), sent_to, self.counters, "", self.name)
        if msg is not None:
            self._finish(msg.id, *_outcome(msg))

    def _expire(self, now: float) -> None:
        for req_id, (_, deadline, peer) in list(self._pending.items()):
            if now > deadline:
                self.counters["timeouts"] += 1
                self._finish(req_id, exc=TimeoutError(f"no reply from {peer}"))


def _take_reply(sock: zmq.Socket, sender: Optional[str], sent_to: Callable[[int], Optional[str]],
                counters: dict[str, int], prefix: str, name: str) -> Optional[Message]:
    """Receive one reply from ``sock``, which reaches the peer ``sender``: counted (under
    ``prefix``) and validated. None when malformed, or when it answers a pending request
    that went to another peer (``sent_to``: the peer a pending request id went to)."""
    frames = sock.recv_multipart(copy=False)
    counters[prefix + "bytes_received"] += sum(len(f.buffer) for f in frames)
    try:
        msg: Message = decode(frames)
    except FrameError as e:
        counters[prefix + "errors"] += 1
        logger.warning("%s: malformed reply from %s: %s", name, sender, e)
        return None
    peer = sent_to(msg.id)
    if peer is not None and peer != sender:
        counters[prefix + "replies_wrong_peer"] += 1
        return None  # an answer to a request this peer was never sent
    counters[prefix + "replies"] += 1
    return msg


def _outcome(msg: Message) -> tuple[Any, Optional[BaseException]]:
    """(result, exception) of a reply: an ``error`` message fails its request."""
    if msg.kind == "error":
        return None, PeerError(str(msg.header.get("reason", "error")))
    return msg, None


class DirectFuture(ReadOnWaitFuture):
    """The reply to a direct request: read from that thread's sockets (``_Lane.wait``)."""


class _Lane:
    """One thread's direct sockets, one per peer, and the requests awaiting replies on
    them. Only its thread touches it."""

    def __init__(self, agent: PeerAgent) -> None:
        self.agent = agent
        self.thread = threading.get_ident()
        self.sockets: dict[str, tuple[zmq.Socket, int]] = {}
        self.refused: dict[str, int] = {}  # peer -> generation it had no key in (not retried)
        self.by_socket: dict[zmq.Socket, str] = {}
        self.pending: dict[int, tuple[DirectFuture, str]] = {}
        self.poller = zmq.Poller()

    def _socket(self, peer: str) -> Optional[zmq.Socket]:
        agent = self.agent
        gen = agent._generation.get(peer, 0)
        cur = self.sockets.get(peer)
        if cur is not None and cur[1] == gen:
            return cur[0]
        if cur is not None:  # the peer reconnected or left: this socket is stale
            self._close(peer)
        endpoint = agent._endpoints.get(peer)
        if endpoint is None or self.refused.get(peer) == gen:
            return None
        s = agent._new_socket(peer, endpoint)
        if s is None:  # no CURVE key for it (logged once): the agent's path, which refuses too
            self.refused[peer] = gen
            return None
        with agent._lane_lock:
            if agent._stop.is_set():
                s.close(linger=0)
                return None
            agent._lane_sockets.append(s)
        self.sockets[peer] = (s, gen)
        self.by_socket[s] = peer
        self.poller.register(s, zmq.POLLIN)
        return s

    def _close(self, peer: str) -> None:
        s, _ = self.sockets.pop(peer)
        self.by_socket.pop(s, None)
        self.poller.unregister(s)
        with self.agent._lane_lock:
            if s in self.agent._lane_sockets:
                self.agent._lane_sockets.remove(s)
        s.close(linger=0)
        for req_id, (_, p) in list(self.pending.items()):
            if p == peer:
                self._finish(req_id, exc=ConnectionError(f"peer {peer} reconnected or left"))

    def send(self, peer: str, kind: str, header: Optional[dict[str, Any]],
             buffers: Sequence[Buffer], timeout: float) -> Optional[DirectFuture]:
        """The request sent on this thread's socket; None to take the agent's path."""
        try:
            sock = self._socket(peer)
            if sock is None:
                return None
            req_id = next(self.agent._ids)
            frames = encode(kind, req_id, header, buffers)
            sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # not connected yet (Again), or closed by the agent's close()
            return None
        fut = DirectFuture(self, req_id, time.monotonic() + timeout)
        self.pending[req_id] = (fut, peer)
        counters = self.agent.counters
        counters["direct_sent"] += 1
        counters["direct_bytes_sent"] += sum(memoryview(f).nbytes for f in frames)
        return fut

    def wait(self, fut: DirectFuture, timeout: Optional[float]) -> None:
        """Receive on this thread's sockets until ``fut`` is done or ``timeout`` passes."""
        if threading.get_ident() != self.thread:
            raise RuntimeError("a direct request's reply is received by the thread that sent it")
        give_up = time.monotonic() + timeout if timeout is not None else math.inf
        while not fut.done():
            # Read first, even with no time left: a reply that came while this thread
            # computed is in its socket already.
            left = min(give_up, fut.deadline) - time.monotonic()
            try:
                events = self.poller.poll(int(left * 1000) + 1 if left > 0 else 0)
            except zmq.ZMQError:  # sockets closed by the agent's close()
                self._finish(fut.req_id, exc=ConnectionError("peer agent stopped"))
                return
            for sock, _ in events:
                self._receive(sock)
            if fut.done():
                return
            self._expire(time.monotonic())
            if left <= 0:
                return  # the caller's own timeout: Future.result(0) raises TimeoutError

    def _receive(self, sock: zmq.Socket) -> None:
        def sent_to(req_id: int) -> Optional[str]:
            entry = self.pending.get(req_id)
            return entry[1] if entry is not None else None

        msg = _take_reply(sock, self.by_socket.get(sock), sent_to, self.agent.counters, "direct_",
                          self.agent.name)
        if msg is not None:
            self._finish(msg.id, *_outcome(msg))

    def _expire(self, now: float) -> None:
        for req_id, (fut, peer) in list(self.pending.items()):
            if now > fut.deadline:
                self.agent.counters["direct_timeouts"] += 1
                self._finish(req_id, exc=TimeoutError(f"no reply from {peer}"))

    def _finish(self, req_id: int, result: Any = None, exc: Optional[BaseException] = None) -> None:
        entry = self.pending.pop(req_id, None)
        if entry is None or entry[0].done():
            return
        if exc is not None:
            entry[0].set_exception(exc)
        else:
            entry[0].set_result(result)
