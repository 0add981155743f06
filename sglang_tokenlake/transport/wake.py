"""Wake a thread that sleeps in a ZeroMQ poller, from any thread."""

from __future__ import annotations

import itertools
import threading

import zmq

_ids = itertools.count()


class Waker:
    """A PULL socket for the sleeping thread's poller; ``wake()`` from anywhere."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self.endpoint = f"inproc://tokenlake-wake-{id(self)}-{next(_ids)}"
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)
        self._local = threading.local()

    def wake(self) -> None:
        s = getattr(self._local, "push", None)
        if s is None:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 1)
            s.connect(self.endpoint)
            self._local.push = s
        try:
            s.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is pending already

    def drain(self) -> None:
        while True:
            try:
                self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
