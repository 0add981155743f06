"""Wake a thread that sleeps in a ZeroMQ poller, from any thread."""

from __future__ import annotations

import itertools
import threading

import zmq

_ids = itertools.count()


class Waker:
    """A PULL socket for the sleeping thread's poller; ``wake()`` from anywhere.

    Each waking thread gets its own PUSH socket (ZeroMQ sockets are not shared
    between threads); ``close()`` closes them all and the PULL socket. The PULL
    socket belongs to the sleeping thread once that thread polls it.
    """

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self.endpoint = f"inproc://tokenlake-wake-{id(self)}-{next(_ids)}"
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)
        self._local = threading.local()
        self._pushes: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        if self._closed:
            return
        s = getattr(self._local, "push", None)
        if s is None:
            with self._lock:
                if self._closed:
                    return
                s = self.ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 1)
                s.connect(self.endpoint)
                self._pushes.append(s)
            self._local.push = s
        try:
            s.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is pending already
        except zmq.ZMQError:
            if not self._closed:
                raise  # else closed under us: nobody is left to wake

    def drain(self) -> None:
        while True:
            try:
                self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def close(self) -> None:
        """Close every socket; call once the sleeping thread no longer polls."""
        with self._lock:
            self._closed = True
            for s in self._pushes:
                s.close(linger=0)
            self._pushes.clear()
        self.socket.close(linger=0)
