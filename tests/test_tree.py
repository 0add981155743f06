"""The segment tree: match/insert/evict order, locks, collisions, counters."""

import pytest

from sglang_tokenlake.segments import namespace_seed, segment_bytes, segment_keys
from sglang_tokenlake.tree import SegmentTree

S = 4
SEED = namespace_seed("test")


def chain(tokens):
    return segment_keys(tokens, S, SEED), segment_bytes(tokens, S)


def insert(tree, tokens, tag):
    keys, raw = chain(tokens)
    return tree.insert(keys, raw, [f"{tag}{i}" for i in range(len(keys))])


def check(tree, capacity_segments=None):
    """The tree's invariant: counters equal a recount; cached = locked + evictable."""
    tree.check()
    assert tree.cached_tokens == tree.locked_tokens + tree.evictable_tokens
    assert tree.cached_tokens == S * sum(1 for n in tree.iter_nodes() if n.is_local)


def test_insert_then_match():
    t = SegmentTree(S)
    out = insert(t, list(range(10)), "a")
    assert out.adopted == [True, True]
    assert [n.value for n in out.path] == ["a0", "a1"]
    keys, raw = chain(list(range(10)))
    assert [n.value for n in t.match(keys, raw)] == ["a0", "a1"]
    # A longer request sharing 1 segment matches exactly 1.
    keys2, raw2 = chain([0, 1, 2, 3, 9, 9, 9, 9])
    assert [n.value for n in t.match(keys2, raw2)] == ["a0"]
    check(t)


def test_duplicate_insert_is_not_adopted():
    t = SegmentTree(S)
    insert(t, list(range(8)), "a")
    out = insert(t, list(range(12)), "b")
    assert out.adopted == [False, False, True]
    assert [n.value for n in out.path] == ["a0", "a1", "b2"]
    assert t.cached_tokens == 3 * S
    check(t)


def test_evict_is_lru_and_leaf_first():
    t = SegmentTree(S)
    insert(t, [1] * 4 + [2] * 4 + [3] * 4, "x")  # x0 - x1 - x2
    insert(t, [1] * 4 + [5] * 4, "y")  # x0 - y1 (y shares x0)
    # Touch the x chain so y1 is least recently used.
    t.match(*chain([1] * 4 + [2] * 4 + [3] * 4))
    dropped = t.evict(S)
    assert [v for _, v in dropped] == ["y1"]
    # x0 is not a leaf while x1 is local: leaves go first, then their parents.
    dropped = t.evict(100 * S)
    assert [v for _, v in dropped] == ["x2", "x1", "x0"]
    assert t.cached_tokens == 0
    assert list(t.iter_nodes()) == []  # nodes without owners are pruned
    check(t)


def test_copies_held_elsewhere_are_evicted_first_wherever_they_sit():
    t = SegmentTree(S)
    keys, raw = chain(list(range(16)))
    # d0 and d3 are this worker's (designated); t1 and t2 are transient copies of
    # segments homed elsewhere. t1's home holds it; t2's home has not acknowledged.
    t.insert(keys, raw, ["d0", "t1", "t2", "d3"], designated=[True, False, False, True])
    t.add_owner_chain(keys[:2], [1], "home")
    t.match(keys, raw)  # all equally recent
    dropped = t.evict(S)
    # t1 goes although it is no leaf: its home serves the hole; nothing is lost.
    assert [v for _, v in dropped] == ["t1"]
    assert [n.value for n in t.match(keys, raw)] == ["d0"]
    assert t.walk(keys)[1].owners == {"home"} and t.walk(keys)[3].value == "d3"
    # Then leaves, transient first: t2 cannot go before its local child d3.
    assert [v for _, v in t.evict(S)] == ["d3"]
    assert [v for _, v in t.evict(S)] == ["t2"]
    check(t)
    # A locked copy stays.
    t2 = SegmentTree(S)
    t2.insert(keys, raw, ["d0", "t1", "t2", "d3"], designated=[True, False, False, True])
    t2.add_owner_chain(keys[:2], [1], "home")
    t2.lock(t2.walk(keys)[3])
    assert t2.evict(S) == []
    check(t2)


def test_evict_stops_when_enough():
    t = SegmentTree(S)
    insert(t, list(range(16)), "a")
    dropped = t.evict(S + 1)  # needs two segments to reach S + 1 tokens
    assert [v for _, v in dropped] == ["a3", "a2"]
    check(t)


def test_locks_protect_the_path():
    t = SegmentTree(S)
    out = insert(t, list(range(12)), "a")
    assert t.lock(out.path[1]) == 2 * S  # a0 and a1 become locked
    assert (t.locked_tokens, t.evictable_tokens) == (2 * S, S)
    dropped = t.evict(100 * S)
    assert [v for _, v in dropped] == ["a2"]  # only the unlocked leaf
    check(t)
    assert t.unlock(out.path[1]) == 2 * S
    assert [v for _, v in t.evict(100 * S)] == ["a1", "a0"]
    with pytest.raises(RuntimeError):
        t.unlock(out.path[0])
    check(t)


def test_nested_locks_count():
    t = SegmentTree(S)
    out = insert(t, list(range(8)), "a")
    t.lock(out.path[1])
    t.lock(out.path[0])
    assert t.locked_tokens == 2 * S
    t.unlock(out.path[1])
    assert t.locked_tokens == S and t.evictable_tokens == S
    assert [v for _, v in t.evict(10 * S)] == ["a1"]
    t.unlock(out.path[0])
    check(t)


def test_token_verification_stops_a_collision():
    t = SegmentTree(S)
    insert(t, list(range(8)), "a")
    keys, raw = chain(list(range(8)))
    # Same keys, different tokens (as a 64-bit collision would look).
    fake_raw = segment_bytes([0, 1, 2, 3, 4, 5, 6, 99], S)
    assert len(t.match(keys, fake_raw)) == 1
    assert len(t.match(keys, None)) == 2  # verification off trusts keys
    out = t.insert(keys, fake_raw, ["b0", "b1"])
    assert out.adopted == [False]  # stops at the colliding segment, takes nothing
    assert [n.value for n in out.path] == ["a0"]
    check(t)


def test_remote_owner_entries():
    t = SegmentTree(S)
    keys, raw = chain(list(range(8)))
    t.add_owner_chain(keys[:2], [1], "w2")
    node = t.nodes[keys[1]]
    assert not node.is_local and node.owners == {"w2"}
    assert t.match(keys, raw) == []  # remote segments are not a local hit
    assert t.cached_tokens == 0
    out = t.insert(keys, raw, ["a0", "a1"])
    assert out.adopted == [True, True]
    assert out.path[1] is node and node.owners == {"w2"}
    # Evicting the local copy keeps the remote entry.
    t.evict(100 * S)
    assert [n.owners for n in t.iter_nodes() if n.owners] == [{"w2"}]
    t.remove_owner_keys([node.key], "w2")
    assert list(t.iter_nodes()) == []
    check(t)


def test_many_random_operations_keep_counters_exact():
    import random

    rng = random.Random(7)
    t = SegmentTree(S)
    locked = []
    prefixes = [[rng.randrange(5) for _ in range(S * rng.randint(1, 6))] for _ in range(30)]
    for step in range(2000):
        op = rng.random()
        toks = rng.choice(prefixes)
        if op < 0.4:
            insert(t, toks, f"s{step}-")
        elif op < 0.6:
            path = t.match(*chain(toks))
            if path:
                t.lock(path[-1])
                locked.append(path[-1])
        elif op < 0.8 and locked:
            t.unlock(locked.pop(rng.randrange(len(locked))))
        else:
            for node, _ in t.evict(rng.randint(1, 5) * S):
                assert node.lock_ref == 0
        if step % 50 == 0:
            check(t)
    for n in locked:
        t.unlock(n)
    check(t)
    t.evict(10**9)
    assert t.cached_tokens == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_each_eviction_takes_the_leaf_a_full_scan_would(seed):
    # The tree keeps its evictable leaves in a heap that is updated lazily; whatever was
    # used, locked, unlocked, made transient or aged since, each eviction must take the
    # leaf that sorting every evictable leaf (transient first, then least recently used)
    # would take.
    import random

    rng = random.Random(seed)
    t = SegmentTree(S)
    locked = []
    prefixes = [[rng.randrange(4) for _ in range(S * rng.randint(1, 6))] for _ in range(40)]
    for step in range(3000):
        op = rng.random()
        toks = rng.choice(prefixes)
        if op < 0.3:
            insert(t, toks, f"s{step}-")
        elif op < 0.45:
            t.match(*chain(toks))  # a use
        elif op < 0.55:
            path = t.match(*chain(toks))
            if path:
                t.lock(path[-1])
                locked.append(path[-1])
        elif op < 0.65 and locked:
            t.unlock(locked.pop(rng.randrange(len(locked))))
        elif op < 0.75:
            local = [n for n in t.iter_nodes() if n.is_local]
            if local:
                t.set_designated(rng.choice(local), rng.random() < 0.5)
        elif op < 0.8:
            keys, raw = chain(toks)
            i = len(keys) - 1
            t.adopt(keys, f"a{step}", raw[i * S * 8:(i + 1) * S * 8], designated=True,
                    last_access=rng.randrange(t.clock + 1))  # a spilled copy, aged
        else:
            leaves = [n for n in t.iter_nodes()
                      if n.is_local and n.lock_ref == 0 and n.nlocal == 0]
            want = min(leaves, key=lambda n: (n.designated, n.last_access, n.id), default=None)
            assert t.oldest_access() == min((n.last_access for n in leaves), default=None)
            got = t.evict(S)
            assert [n for n, _ in got] == ([want] if want is not None else [])
        if step % 100 == 0:
            check(t)
    check(t)
