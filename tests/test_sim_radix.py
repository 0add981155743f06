"""SGLang's radix tree in the simulator (sim/radix.py): whole nodes, chunks, locks."""

from dataclasses import replace

import pytest

from sglang_tokenlake.sim.cache import PrefixLRU
from sglang_tokenlake.sim.engine import simulate
from sglang_tokenlake.sim.model import SimConfig
from sglang_tokenlake.sim.radix import RadixNodeLRU
from sglang_tokenlake.sim.workloads import Request, Workload, piece_keys

A = list(range(100, 108))  # two chains of 8 block keys
B = list(range(200, 208))


def test_a_node_is_evicted_whole_where_blocks_go_one_by_one():
    radix, blocks = RadixNodeLRU(12), PrefixLRU(12)
    for c in (radix, blocks):
        c.use(A)
    assert radix.use(B) == A  # 16 > 12: A's node, all 8 blocks
    assert blocks.use(B) == A[4:][::-1]  # only the 4 deepest blocks
    assert radix.match(A) == 0 and blocks.match(A) == 4
    assert len(radix) == 8 and radix.evicted_nodes == 1


def test_chunked_prefill_ends_a_node_at_each_chunk():
    c = RadixNodeLRU(8, chunk_blocks=3)  # A goes in as [0:3] [3:6] [6:8]
    c.use(A)
    c.capacity = 7
    assert c.overflow() == A[6:]  # the deepest chunk, 2 blocks for 1 over
    c.capacity = 5
    assert c.overflow() == A[3:6]
    assert c.match(A) == 3
    # chunks count from the cached prefix: A[:3] cached, 5 new blocks -> [3:6] [6:8]
    c.capacity = 100
    c.use(A)
    c.capacity = 6
    assert c.overflow() == A[6:]


def test_a_diverging_prompt_splits_the_node_and_the_older_branch_goes_first():
    c = RadixNodeLRU(16)
    c.use(A)
    other = A[:3] + B[:3]
    c.use(other)  # A split at 3: [0:3] -> {[3:8], B[0:3]}
    c.capacity = 9
    assert c.overflow() == A[3:]  # the least recently used leaf, whole
    assert c.match(other) == 6 and c.match(A) == 3
    c.capacity = 3
    assert c.overflow() == B[:3]  # then the other leaf; the shared node is next
    assert c.overflow() == [] and len(c) == 3
    c.capacity = 0
    assert c.overflow() == A[:3]


def test_a_locked_prefix_is_never_evicted_until_released():
    c = RadixNodeLRU(16)
    c.use(A)
    c.use(B)
    h = c.lock(A[:5])  # a running request on A's first 5 blocks: splits A at 5
    c.capacity = 0
    assert c.overflow() == A[5:] + B  # A's unlocked tail (older), then B; A[:5] stays
    assert c.match(A) == 5
    c.unlock(h)
    assert c.overflow() == A[:5] and len(c) == 0
    with pytest.raises(RuntimeError):
        c.unlock(h)


def _squeeze(capacity: int) -> Workload:
    # Blocks of 100 tokens, one instance. A reads context X and ends; D reads context Y
    # at t=10 with a 1,000-token answer (10 blocks held while it runs); B reads X at
    # 10.1 while D runs; C reads Y long after.
    x, y = piece_keys([(1, 500)], 100), piece_keys([(2, 500)], 100)
    return Workload("t", 100, [Request(0.0, 500, 1, x), Request(10.0, 500, 1000, y),
                               Request(10.1, 500, 1, x), Request(1e6, 500, 1, y)])


def test_the_replays_radix_model_drops_what_the_block_model_keeps():
    radix = SimConfig(1, 16, 100, shared_prefix_kv=True, radix_nodes=True)
    blocks = SimConfig(1, 16, 100, shared_prefix_kv=True)
    # 16 - 10 = 6 blocks beside D: X (5) + Y (5) is 4 over. The block model evicts X's 4
    # deepest blocks, B hits the first, puts X back and evicts 4 of Y's blocks, on which
    # D runs: C hits 1. SGLang evicts X's node whole (B misses, and X, put back, is the
    # only node it can evict again) and keeps Y, locked by D: C hits all of it.
    assert simulate(_squeeze(16), "stock", blocks).hit_tokens == 100 + 100
    assert simulate(_squeeze(16), "stock", radix).hit_tokens == 0 + 500
    # 13 - 10 = 3 blocks: the block model loses X and Y; the radix model keeps Y.
    assert simulate(_squeeze(13), "stock", replace_(blocks, 13)).hit_tokens == 0
    assert simulate(_squeeze(13), "cache_aware", replace_(radix, 13)).hit_tokens == 0 + 500
    # Once D has ended its lock is gone: a third context evicts Y like any other node.
    w = _squeeze(16)
    z = piece_keys([(3, 1200)], 100)
    w.requests.append(Request(2e6, 1200, 1, z))
    w.requests.append(Request(3e6, 500, 1, w.requests[1].keys))
    assert simulate(w, "stock", radix).hit_tokens == 500  # 12 + 5 > 16: Y goes, not Z


def replace_(cfg: SimConfig, capacity: int) -> SimConfig:
    return replace(cfg, capacity_blocks=capacity)


def test_a_queued_request_matches_the_cache_as_it_is_when_it_starts():
    # One instance of 10 blocks of 100 tokens. A reads context X (5 blocks), B reads Y
    # (8 blocks) right after, C reads X again while both are queued. C starts after B,
    # whose prompt evicted X's node (X unlocked once A ended): SGLang, matching C at
    # admission, misses. Matched on arrival, C would find X still locked by A.
    x, y = piece_keys([(1, 500)], 100), piece_keys([(2, 800)], 100)
    wl = Workload("t", 100, [Request(0.0, 500, 1, x), Request(0.001, 800, 1, y),
                             Request(0.002, 500, 1, x)])
    at_arrival = SimConfig(1, 10, 100, shared_prefix_kv=True, radix_nodes=True)
    at_start = SimConfig(1, 10, 100, shared_prefix_kv=True, radix_nodes=True,
                         match_at_admission=True)
    arrival, start = simulate(wl, "stock", at_arrival), simulate(wl, "stock", at_start)
    assert arrival.hits == [0, 0, 500]
    assert start.hits == [0, 0, 0]
    assert start.wait == arrival.wait and start.wait[2] > 0  # C did queue behind B
    # Nothing queued: arrival and start are one moment. Each prompt evicts the other
    # context's node (unlocked, its request ended), so every request misses.
    spaced = Workload("t", 100, [replace(r, arrival_s=1e5 * i) for i, r in
                                 enumerate([*wl.requests, Request(0.0, 800, 1, y)])])
    for policy in ("stock", "cache_aware"):
        assert simulate(spaced, policy, at_arrival).hits == [0, 0, 0, 0]
        assert simulate(spaced, policy, at_start).hits == [0, 0, 0, 0]
    # B queued behind A: matched at arrival, Y is the one unlocked node and goes whole,
    # X is kept for a later request; at admission A has ended and X goes instead.
    late = Workload("t", 100, [*wl.requests[:2], Request(1e6, 500, 1, x)])
    assert simulate(late, "stock", at_arrival).hits == [0, 0, 500]
    assert simulate(late, "stock", at_start).hits == [0, 0, 0]


def test_a_request_locks_its_prefix_before_its_kv_and_frees_its_kv_before_unlocking():
    # 10 blocks; A reads X (5 blocks) and writes 600 tokens (6 blocks held while it runs):
    # 4 blocks beside A's KV, less than X. Locked first, X survives A's allocation, and
    # A's KV is freed before X is unlocked, so B, queued behind A, still finds X.
    # (Allocating before locking would evict X whole; unlocking first would evict it
    # before the 6 blocks came back.)
    x = piece_keys([(1, 500)], 100)
    wl = Workload("t", 100, [Request(0.0, 500, 600, x), Request(0.001, 500, 1, x)])
    cfg = SimConfig(1, 10, 100, shared_prefix_kv=True, radix_nodes=True,
                    match_at_admission=True)
    res = simulate(wl, "stock", cfg)
    assert res.hits == [0, 500] and res.wait[1] > 0


def test_the_radix_model_needs_shared_prefix_kv():
    with pytest.raises(ValueError, match="shared_prefix_kv"):
        SimConfig(1, 16, 100, radix_nodes=True)
    with pytest.raises(ValueError, match="chunked_prefill_tokens"):
        SimConfig(1, 16, 100, shared_prefix_kv=True, radix_nodes=True, chunked_prefill_tokens=-1)
    with pytest.raises(ValueError, match="match_at_admission needs radix_nodes"):
        SimConfig(1, 16, 100, shared_prefix_kv=True, match_at_admission=True)
