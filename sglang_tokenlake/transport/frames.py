"""Wire format of TokenLake messages: one msgpack header frame + raw buffer frames.

::

    frame 0   msgpack map  {"v": 1, "t": "<kind>", "id": <request id>, "b": [len0, len1, ...], ...}
    frame 1   raw bytes of buffer 0   (tensor data, sent without copies)
    frame 2   raw bytes of buffer 1
    ...

``b`` lists the byte size of every buffer frame; a message whose frame count
or sizes disagree with it is rejected. Everything a peer sends is validated
before any handler sees it: unknown kinds, wrong types and oversized headers
raise ``FrameError`` (the broker counts, logs and drops such messages).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_BUFFERS = 4096

Buffer = Union[bytes, bytearray, memoryview]


class FrameError(ValueError):
    """A message that does not follow the wire format."""


class PeerError(RuntimeError):
    """The peer answered with an error message."""


@dataclass
class Message:
    kind: str
    id: int
    header: dict[str, Any] = field(default_factory=dict)
    buffers: list[memoryview] = field(default_factory=list)


def encode(kind: str, req_id: int, header: dict[str, Any] | None = None,
           buffers: Sequence[Buffer] = ()) -> list[Buffer]:
    """Frames of one message; buffers are passed through without copying."""
    h = dict(header or {})
    for reserved in ("v", "t", "id", "b"):
        if reserved in h:
            raise ValueError(f"header key {reserved!r} is reserved")
    h["v"] = VERSION
    h["t"] = kind
    h["id"] = int(req_id)
    h["b"] = [memoryview(b).nbytes for b in buffers]
    return [msgpack.packb(h, use_bin_type=True), *buffers]


def decode_header(head: bytes, known_kinds: frozenset[str] | None = None,
                  ) -> tuple[str, int, dict[str, Any], list[int]]:
    """Validate a header frame: (kind, request id, the other fields, buffer sizes)."""
    if len(head) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(
            head,
            raw=False,
            strict_map_key=True,
            max_array_len=1 << 16,
            max_map_len=1 << 12,
        )
    except Exception as e:  # msgpack raises many types for bad input
        raise FrameError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(h, dict):
        raise FrameError(f"header is a {type(h).__name__}, not a map")
    if h.get("v") != VERSION:
        raise FrameError(f"unsupported protocol version {h.get('v')!r}")
    kind = h.get("t")
    if not isinstance(kind, str):
        raise FrameError("header has no message kind")
    if known_kinds is not None and kind not in known_kinds:
        raise FrameError(f"unknown message kind {kind!r}")
    req_id = h.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool):
        raise FrameError("header has no integer request id")
    sizes = h.get("b")
    if not isinstance(sizes, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes
    ):
        raise FrameError("header has no valid buffer size list")
    if len(sizes) > MAX_BUFFERS:
        raise FrameError(f"{len(sizes)} buffers exceed {MAX_BUFFERS}")
    for reserved in ("v", "t", "id", "b"):
        del h[reserved]
    return kind, req_id, h, sizes


def decode(frames: Sequence[Any], known_kinds: frozenset[str] | None = None) -> Message:
    """Validate and decode frames (bytes or zmq.Frame) into a Message."""
    if not frames:
        raise FrameError("empty message")
    kind, req_id, h, sizes = decode_header(_bytes_of(frames[0]), known_kinds)
    if len(sizes) != len(frames) - 1:
        raise FrameError(f"header announces {len(sizes)} buffers, message has {len(frames) - 1}")
    buffers = []
    for i, (size, frame) in enumerate(zip(sizes, frames[1:])):
        mv = _view_of(frame)
        if mv.nbytes != size:
            raise FrameError(f"buffer {i} has {mv.nbytes} bytes, header says {size}")
        buffers.append(mv)
    return Message(kind, req_id, h, buffers)


def _bytes_of(frame: Any) -> bytes:
    if isinstance(frame, (bytes, bytearray)):
        return bytes(frame)
    b = getattr(frame, "bytes", None)  # zmq.Frame
    if b is not None:
        return b
    return memoryview(frame).tobytes()


def _view_of(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame: zero-copy view
    if buf is not None:
        return memoryview(buf).cast("B")
    return memoryview(frame).cast("B")
