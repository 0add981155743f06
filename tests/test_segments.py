"""Chained segment keys: exact values, chaining, namespaces."""

from array import array

import numpy as np
import pytest
import xxhash

from sglang_tokenlake.segments import (
    chain_key,
    keys_from_bytes,
    namespace_seed,
    request_namespace,
    segment_bytes,
    segment_keys,
)


def _ref_key(parent: int, tokens: list[int]) -> int:
    data = b"".join(t.to_bytes(8, "little", signed=True) for t in tokens)
    return xxhash.xxh3_64_intdigest(data, seed=parent)


def test_exact_keys_follow_the_chain():
    seed = namespace_seed("model")
    toks = list(range(100, 111))  # 11 tokens: two full segments of 4, tail of 3
    keys = segment_keys(toks, 4, seed)
    k0 = _ref_key(seed, toks[0:4])
    k1 = _ref_key(k0, toks[4:8])
    assert keys == [k0, k1]
    assert chain_key(seed, toks[0:4]) == k0
    assert chain_key(k0, toks[4:8]) == k1


def test_input_types_agree():
    seed = namespace_seed("m")
    toks = [5, 6, 7, 8, 9, 10, 11, 12]
    want = segment_keys(toks, 4, seed)
    assert segment_keys(array("q", toks), 4, seed) == want
    assert segment_keys(np.asarray(toks, dtype=np.int32), 4, seed) == want
    assert segment_keys(np.asarray(toks, dtype=np.int64), 4, seed) == want


def test_limit_and_tail():
    seed = namespace_seed("m")
    toks = list(range(20))
    assert len(segment_keys(toks, 8, seed)) == 2
    assert segment_keys(toks, 8, seed, limit=15) == segment_keys(toks, 8, seed)[:1]
    assert segment_keys(toks[:7], 8, seed) == []


def test_prefix_determines_key():
    seed = namespace_seed("m")
    a = segment_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, seed)
    b = segment_keys([1, 2, 3, 4, 5, 6, 7, 9], 4, seed)
    c = segment_keys([0, 2, 3, 4, 5, 6, 7, 8], 4, seed)
    assert a[0] == b[0] and a[1] != b[1]
    # Same second segment after a different first one: a different key.
    assert c[0] != a[0] and c[1] != a[1]


def test_namespaces_never_share():
    toks = list(range(16))
    seeds = {
        request_namespace("m"),
        request_namespace("m", extra_key="lora-a"),
        request_namespace("m", extra_key="lora-b"),
        request_namespace("m", cache_salt="tenant-1"),
        request_namespace("m", cache_salt="tenant-2"),
        request_namespace("m", extra_key="lora-a", cache_salt="tenant-1"),
        request_namespace("other-model"),
    }
    assert len(seeds) == 7
    assert len({segment_keys(toks, 4, s)[0] for s in seeds}) == 7
    # An empty salt is no salt (SGLang normalizes it the same way).
    assert request_namespace("m", cache_salt="") == request_namespace("m")
    # Part boundaries are unambiguous.
    assert namespace_seed("ab", "c") != namespace_seed("a", "bc")
    assert namespace_seed("m", None) != namespace_seed("m", "")


def test_keys_from_bytes_resumes_a_chain():
    seed = namespace_seed("m")
    raw = segment_bytes(list(range(40)), 8)
    full = keys_from_bytes(raw, 8, seed)
    assert keys_from_bytes(raw, 8, seed, start=3, parent=full[2]) == full[3:]
    with pytest.raises(ValueError):
        keys_from_bytes(raw, 8, seed, start=1)
    with pytest.raises(ValueError):
        keys_from_bytes(raw[:-8], 8, seed)
    with pytest.raises(ValueError):
        segment_keys([1, 2], 0, seed)
