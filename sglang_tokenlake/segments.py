"""Chained segment keys and cache namespaces.

A prefix is cut into fixed-size segments. The KV of a segment depends on every
token before it, so a segment is named by a chained hash:

    key_0 = H(tokens[0 : S];         seed)
    key_i = H(tokens[i*S : (i+1)*S]; key_{i-1})

where ``seed`` is the namespace (model, LoRA / extra_key, cache_salt) and
``H(data; s)`` is XXH3-64 of the little-endian int64 bytes with seed ``s``
(the previous key seeds the next hash: one call per segment, no concatenation). Two prefixes share the key of segment
``i`` exactly when they share the namespace and the first ``(i+1)*S`` tokens
(up to hash collisions, which the tree guards against by keeping the tokens
of local segments and comparing them).

Plain Python + numpy + xxhash: no torch, sglang or zmq here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import xxhash

SegmentKey = int
"""A 64-bit unsigned segment key."""

_KEY_BYTES = 8


def namespace_seed(*parts: Optional[str]) -> SegmentKey:
    """The root key of a namespace: a hash over its parts.

    ``None`` and ``""`` are distinct from each other and from every string, so
    ``namespace_seed("m", None)`` never equals ``namespace_seed("m", "")``.
    """
    h = xxhash.xxh3_64()
    h.update(b"tokenlake-ns-v1")
    for part in parts:
        if part is None:
            h.update(b"\x00")
        else:
            data = part.encode("utf-8")
            h.update(b"\x01" + len(data).to_bytes(8, "little") + data)
    return h.intdigest()


def request_namespace(
    model_id: str, extra_key: Optional[str] = None, cache_salt: Optional[str] = None
) -> SegmentKey:
    """The namespace of a request: tenants (cache_salt) and LoRA/extra keys never share."""
    return namespace_seed(model_id, extra_key, cache_salt or None)


def _as_int64(tokens: Sequence[int]) -> np.ndarray:
    if isinstance(tokens, np.ndarray):
        return np.ascontiguousarray(tokens, dtype=np.int64)
    # array('q') and memoryviews convert without a Python-level loop.
    try:
        return np.frombuffer(tokens, dtype=np.int64)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return np.asarray(tokens, dtype=np.int64)


def chain_key(parent: SegmentKey, segment_tokens: Sequence[int]) -> SegmentKey:
    """The key of one segment given its parent's key (or the namespace seed)."""
    data = _as_int64(segment_tokens).astype("<i8", copy=False)
    return xxhash.xxh3_64_intdigest(data.tobytes(), parent)


def segment_keys(
    tokens: Sequence[int],
    segment_size: int,
    seed: SegmentKey,
    *,
    limit: Optional[int] = None,
) -> list[SegmentKey]:
    """Keys of the full segments of ``tokens`` (``tokens[:limit]`` when given).

    Args:
        tokens: token ids (list, ``array('q')`` or int64 ndarray).
        segment_size: tokens per segment (> 0).
        seed: namespace seed; the parent of segment 0.

    Returns:
        ``[key_0, ..., key_{n-1}]`` with ``n = len(tokens[:limit]) // segment_size``.
    """
    return keys_from_bytes(segment_bytes(tokens, segment_size, limit=limit), segment_size, seed)


def segment_bytes(
    tokens: Sequence[int], segment_size: int, *, limit: Optional[int] = None
) -> bytes:
    """The little-endian int64 bytes of the full segments of ``tokens[:limit]``."""
    if segment_size <= 0:
        raise ValueError(f"segment_size must be positive, got {segment_size}")
    arr = _as_int64(tokens)
    if limit is not None:
        arr = arr[:limit]
    n = len(arr) // segment_size
    return arr[: n * segment_size].astype("<i8", copy=False).tobytes()


def keys_from_bytes(
    raw: bytes,
    segment_size: int,
    seed: SegmentKey,
    *,
    start: int = 0,
    parent: Optional[SegmentKey] = None,
) -> list[SegmentKey]:
    """Chained keys over ``raw`` (int64 bytes, whole segments), from segment ``start``.

    ``parent`` must be the key of segment ``start - 1`` when ``start > 0``.
    """
    step = segment_size * _KEY_BYTES
    if len(raw) % step:
        raise ValueError("raw token bytes are not a whole number of segments")
    if start > 0 and parent is None:
        raise ValueError("keys_from_bytes: start > 0 needs the parent key")
    prev = seed if start == 0 else parent
    assert prev is not None
    keys: list[SegmentKey] = []
    xxh = xxhash.xxh3_64_intdigest
    for i in range(start, len(raw) // step):
        prev = xxh(raw[i * step : (i + 1) * step], prev)
        keys.append(prev)
    return keys
