"""Segment partial attention + merge-state: split and merge equals one full attention.

CPU tests use the torch reference; GPU tests (marked, skipped without CUDA/flashinfer) check the
FlashInfer path against it on the same cases.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
import torch
from tokenlake_kernels import torch_ref
from tokenlake_kernels.flashinfer_glue import Job, plan_jobs

from sglang_tokenlake.attention import (
    SegmentAttention,
    full_attention,
    merge_stacked,
    merge_state,
    merge_states,
    partial_attention,
    resolve_backend,
    segment_attention,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
KV_HEADS = 2
PREFIX, NEW = 97, 23  # prefill: 97 cached tokens + a block of 23 new ones
DECODE_CTX = 150

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def make_case(n_ctx: int, n_q: int, group: int, head_dim: int, dtype: torch.dtype, seed: int,
              device: str = "cpu"):
    """q, k/v pools with 40 spare slots of noise, and the context's slots in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    num_slots = n_ctx + 40
    q = torch.randn(n_q, KV_HEADS * group, head_dim, generator=g)
    k = torch.randn(num_slots, KV_HEADS, head_dim, generator=g)
    v = torch.randn(num_slots, KV_HEADS, head_dim, generator=g)
    slots = torch.randperm(num_slots, generator=g)[:n_ctx]
    to = {"dtype": dtype, "device": device}
    return q.to(**to), k.to(**to), v.to(**to), slots.to(device)


def oracle(q, k_buffer, v_buffer, slots, *, offset=None, scale, cap=0.0):
    """Float64, GQA by repeating kv heads: independent of the code under test."""
    group = q.shape[1] // k_buffer.shape[1]
    k = k_buffer[slots].double().repeat_interleave(group, dim=1)
    v = v_buffer[slots].double().repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    if cap:
        s = cap * torch.tanh(s / cap)
    if offset is not None:
        i = torch.arange(q.shape[0])[:, None]
        s = s.masked_fill(torch.arange(len(slots))[None, :] > i + offset, -math.inf)
    o = torch.einsum("hnl,lhd->nhd", torch.softmax(s, dim=-1).nan_to_num(0.0), v)
    return o, (torch.logsumexp(s, dim=-1) / math.log(2)).T


def cut(length: int, n_seg: int, rng: random.Random) -> list[tuple[int, int]]:
    """n_seg uneven [start, end) pieces of range(length): from 3 pieces on the second is empty,
    from 4 the third is a single token, from 6 the last is empty, at 8 the first is empty too."""
    cuts = sorted(rng.sample(range(1, length), n_seg - 1))
    if n_seg >= 8:
        cuts[0] = 0
    if n_seg >= 3:
        cuts[1] = cuts[0]
    if n_seg >= 4:
        cuts[2] = cuts[1] + 1
    if n_seg >= 6:
        cuts[-1] = length
    bounds = [0, *cuts, length]
    pieces = list(zip(bounds[:-1], bounds[1:]))
    assert all(s <= e for s, e in pieces) and len(pieces) == n_seg
    return pieces


def case_seed(mode: str, group: int, head_dim: int, n_seg: int) -> int:
    return (mode == "decode") * 5000 + group * 1000 + head_dim * 5 + n_seg


def split_context(mode: str, n_seg: int, seed: int):
    """(n_ctx, n_q, pieces, causal flags, causal offsets) for prefill or decode.

    Queries are the last n_q tokens, at positions p0.. ; piece [s, e) then needs offset p0 - s.
    Pieces ending at or before p0 + 1 are seen whole by every row, so they go in non-causal.
    """
    n_ctx, n_q = (PREFIX + NEW, NEW) if mode == "prefill" else (DECODE_CTX, 1)
    p0 = n_ctx - n_q
    pieces = cut(n_ctx, n_seg, random.Random(seed)) if n_seg > 1 else [(0, n_ctx)]
    causal = [e > p0 + 1 for _, e in pieces]
    return n_ctx, n_q, pieces, causal, [p0 - s for s, _ in pieces]


CASES = [
    (mode, group, head_dim, n_seg)
    for mode in ("prefill", "decode")
    for group in (1, 4, 8)
    for head_dim in (64, 128)
    for n_seg in range(1, 9)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode,group,head_dim,n_seg", CASES)
def test_split_and_merge_equals_full_attention(mode, group, head_dim, n_seg, dtype):
    seed = case_seed(mode, group, head_dim, n_seg)
    n_ctx, n_q, pieces, causal, offsets = split_context(mode, n_seg, seed)
    q, k, v, slots = make_case(n_ctx, n_q, group, head_dim, dtype, seed)
    full = full_attention(q, k, v, slots, causal=True)  # bottom-right: decode sees everything
    parts = segment_attention(q, k, v, [slots[s:e] for s, e in pieces], causal=causal,
                              causal_offsets=offsets)
    assert parts.o.shape == (n_seg, n_q, KV_HEADS * group, head_dim) and parts.o.dtype == dtype
    assert parts.lse.shape == (n_seg, n_q, KV_HEADS * group) and parts.lse.dtype == torch.float32
    merged = merge_stacked(*parts)
    close(merged.o, full.o, dtype)
    close(merged.lse, full.lse, dtype)
    listed = merge_states(list(zip(parts.o, parts.lse)))
    close(listed.o, full.o, dtype)


@pytest.mark.parametrize("cap", [0.0, 5.0])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("offset", [None, 0, 3, -2])
def test_full_attention_matches_float64_oracle(cap, group, offset):
    q, k, v, slots = make_case(60, 9, group, 64, torch.float32, seed=7)
    scale = 0.3  # not 1/sqrt(d): the scale is a real parameter
    ref = full_attention(q, k, v, slots, causal=offset is not None, causal_offset=offset,
                         scale=scale, logit_cap=cap)
    o, lse = oracle(q, k, v, slots, offset=offset, scale=scale, cap=cap)
    torch.testing.assert_close(ref.o.double(), o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.lse.double(), lse, atol=1e-5, rtol=1e-5)


def test_default_causal_offset_is_bottom_right_and_prefix_can_be_non_causal():
    # The TokenLake shape: cached prefix segments (non-causal) + the new block as its own causal
    # segment with the default offset (its keys are exactly the new tokens).
    q, k, v, slots = make_case(PREFIX + NEW, NEW, 4, 64, torch.float32, seed=3)
    segs = [slots[:40], slots[40:PREFIX], slots[PREFIX:]]
    merged = merge_stacked(*segment_attention(q, k, v, segs, causal=[False, False, True]))
    close(merged.o, full_attention(q, k, v, slots, causal=True).o, torch.float32)
    # A causal segment that every row sees whole equals the non-causal one.
    wide = partial_attention(q, k, v, slots[:40], causal=True, causal_offset=39)
    close(wide.o, partial_attention(q, k, v, slots[:40]).o, torch.float32)


def test_empty_segment_is_zero_and_minus_inf():
    q, k, v, slots = make_case(30, 5, 4, 64, torch.float32, seed=1)
    for empty in (slots[:0], []):
        o, lse = partial_attention(q, k, v, empty)
        assert o.shape == (5, 8, 64) and torch.equal(o, torch.zeros_like(o))
        assert torch.isneginf(lse).all()


def test_rows_that_see_nothing_are_empty_states():
    q, k, v, slots = make_case(30, 6, 1, 64, torch.float32, seed=2)
    o, lse = partial_attention(q, k, v, slots[:10], causal=True, causal_offset=-3)
    assert torch.isneginf(lse[:3]).all() and torch.isfinite(lse[3:]).all()
    assert torch.equal(o[:3], torch.zeros_like(o[:3])) and not torch.isnan(o).any()
    close(o[3:], oracle(q, k, v, slots[:10], offset=-3, scale=0.125)[0][3:], torch.float32)


def test_all_empty_merge_gives_zero_without_nan():
    o = torch.randn(4, 3, 8, 64)  # garbage in o of empty states must not leak
    lse = torch.full((4, 3, 8), -math.inf)
    for merged in (merge_stacked(o, lse), merge_states(list(zip(o, lse))),
                   merge_state(o[0], lse[0], o[1], lse[1])):
        assert torch.equal(merged.o, torch.zeros(3, 8, 64))
        assert torch.isneginf(merged.lse).all()


def test_merge_with_an_empty_state_is_identity():
    q, k, v, slots = make_case(30, 5, 4, 128, torch.float32, seed=4)
    state = partial_attention(q, k, v, slots)
    empty = partial_attention(q, k, v, slots[:0])
    for merged in (merge_state(*empty, *state), merge_state(*state, *empty),
                   merge_states([empty, empty, state, empty])):
        close(merged.o, state.o, torch.float32)
        close(merged.lse, state.lse, torch.float32)


def test_single_token_segment_returns_its_value():
    q, k, v, slots = make_case(10, 3, 4, 64, torch.float32, seed=5)
    o, lse = partial_attention(q, k, v, slots[6:7], scale=0.5)
    kv_head = torch.arange(8) // 4  # GQA: query head h reads kv head h // group
    close(o, v[slots[6], kv_head].expand(3, 8, 64), torch.float32)
    logits = 0.5 * torch.einsum("nhd,hd->nh", q, k[slots[6], kv_head])
    close(lse, logits / math.log(2), torch.float32)  # log2(exp(s)) = s / ln 2


def test_lse_is_base_two():
    q, k, v, slots = make_case(50, 4, 4, 64, torch.float32, seed=6)
    lse = partial_attention(q, k, v, slots).lse
    s = 0.125 * torch.einsum("nhd,lhd->nhl", q.double(),
                             k[slots].double().repeat_interleave(4, dim=1))
    close(lse, torch.log2(torch.exp(s).sum(-1)), torch.float32)


def test_merge_is_order_independent():
    q, k, v, slots = make_case(90, 7, 8, 64, torch.float32, seed=8)
    o, lse = segment_attention(q, k, v, [slots[i:i + 13] for i in range(0, 90, 13)])
    ref = merge_stacked(o, lse)
    for perm in ([6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4]):
        m = merge_stacked(o[perm], lse[perm])
        close(m.o, ref.o, torch.float32)
        close(m.lse, ref.lse, torch.float32)
    pairwise = merge_state(*merge_state(o[0], lse[0], o[1], lse[1]), *merge_stacked(o[2:], lse[2:]))
    close(pairwise.o, ref.o, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_soft_cap_splits_exactly_and_changes_the_result(dtype):
    q, k, v, slots = make_case(PREFIX + NEW, NEW, 4, 64, dtype, seed=9)
    q = q * 4  # large logits so the cap bites
    _, n_q, pieces, causal, offsets = split_context("prefill", 5, seed=9)
    segs = [slots[s:e] for s, e in pieces]
    capped_full = full_attention(q, k, v, slots, causal=True, logit_cap=2.0)
    capped = merge_stacked(*segment_attention(q, k, v, segs, causal=causal,
                                              causal_offsets=offsets, logit_cap=2.0))
    close(capped.o, capped_full.o, dtype)
    close(capped.lse, capped_full.lse, dtype)
    plain = full_attention(q, k, v, slots, causal=True)
    assert (plain.o.float() - capped_full.o.float()).abs().max() > 0.1
    huge_cap = full_attention(q, k, v, slots, causal=True, logit_cap=1e6)  # tanh(x)~x: no cap
    close(huge_cap.o, plain.o, dtype)


def test_plan_jobs_cover_each_mask_without_custom_masks():
    assert plan_jobs(4, [5, 0, 3], [None, None, 1]) == [
        Job(0, 0, 4, 5, False), Job(2, 0, 2, 3, True), Job(2, 2, 4, 3, False)]
    assert plan_jobs(1, [7, 7], [6, None]) == [Job(0, 0, 1, 7, False), Job(1, 0, 1, 7, False)]
    assert plan_jobs(3, [4], [-5]) == []  # no row sees anything
    # Executing the entries with bottom-right causal masks (FlashInfer's) reproduces every offset.
    q, k, v, slots = make_case(8, 5, 4, 64, torch.float32, seed=10)
    offsets = [None, *range(-7, 12)]
    jobs = plan_jobs(5, [8] * len(offsets), offsets)
    o = torch.zeros(len(offsets), 5, 8, 64)
    lse = torch.full((len(offsets), 5, 8), -math.inf)
    for j in jobs:
        rows = j.row_end - j.row_start
        assert j.kv_len >= rows or not j.causal  # FlashInfer never sees a fully masked row
        part = torch_ref.attend(q[j.row_start:j.row_end], k, v, slots[:j.kv_len], scale=0.125,
                                offset=j.kv_len - rows if j.causal else None)
        o[j.segment, j.row_start:j.row_end], lse[j.segment, j.row_start:j.row_end] = part
    for seg, c in enumerate(offsets):
        ref = torch_ref.attend(q, k, v, slots, scale=0.125, offset=c)
        close(o[seg], ref[0], torch.float32)
        assert torch.equal(torch.isneginf(lse[seg]), torch.isneginf(ref[1]))
        close(lse[seg].nan_to_num(neginf=0), ref[1].nan_to_num(neginf=0), torch.float32)


def test_plan_object_is_reused_across_layers():
    layers = [make_case(40, 3, 4, 64, torch.float32, seed=s) for s in (11, 12)]
    slots = layers[0][3]
    attn = SegmentAttention([slots[:15], slots[15:]], causal=[False, True])
    for q, k, v, _ in layers:
        close(attn.merged(q, k, v).o, full_attention(q, k, v, slots, causal=True).o, torch.float32)


def test_backend_choice_on_cpu():
    q, k, v, slots = make_case(10, 2, 1, 64, torch.float32, seed=13)
    assert resolve_backend("auto", q, k, v) == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        partial_attention(q, k, v, slots, backend="flashinfer")
    with pytest.raises(ValueError):
        partial_attention(q, k[:, :1].expand(-1, 3, -1), v, slots)  # 2 q heads, 3 kv heads


def test_cpu_use_never_imports_flashinfer():
    code = (
        "import sys, torch\n"
        "from sglang_tokenlake.attention import partial_attention, merge_states\n"
        "q = torch.randn(2, 4, 64); k = torch.randn(9, 2, 64)\n"
        "s = partial_attention(q, k, k, torch.arange(9), causal=True)\n"
        "merge_states([s, s])\n"
        "print('flashinfer' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --- The FlashInfer glue on CPU, against a stand-in with FlashInfer's API ---------------------


class FakeFlashInfer:
    """FlashInfer 0.7.2's calls as the glue uses them (signatures checked against the real package
    below), computed with the torch reference on CPU. Merges use the formula of the older kernels,
    which gives NaN for (-inf) - (-inf), so the glue must not hand them an all-empty row."""

    class BatchPrefillWithPagedKVCacheWrapper:
        def __init__(self, float_workspace_buffer, kv_layout="NHD", *, backend="auto"):
            assert float_workspace_buffer.dtype == torch.uint8 and kv_layout == "NHD"

        def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                 num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, *,
                 causal=False, sm_scale=None, logits_soft_cap=None, q_data_type=None,
                 kv_data_type=None):
            assert page_size == 1 and bool((paged_kv_last_page_len == 1).all())
            assert {t.dtype for t in (qo_indptr, paged_kv_indptr, paged_kv_indices)} == {torch.int32}
            self.qo, self.kv, self.idx = qo_indptr.tolist(), paged_kv_indptr.tolist(), paged_kv_indices
            self.causal, self.scale, self.cap = causal, sm_scale, logits_soft_cap or 0.0
            self.calls = 0

        def run(self, q, paged_kv_cache, *, out=None, lse=None, return_lse=False):
            k, v = paged_kv_cache  # [num_pages, page_size=1, kv_heads, head_dim]
            assert k.dim() == 4 and k.shape[1] == 1 and q.shape[0] == self.qo[-1]
            assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.is_contiguous()
            assert lse.shape == q.shape[:2] and lse.dtype == torch.float32 and return_lse
            for b in range(len(self.qo) - 1):
                (r0, r1), (k0, k1) = self.qo[b:b + 2], self.kv[b:b + 2]
                part = torch_ref.attend(q[r0:r1], k[:, 0], v[:, 0], self.idx[k0:k1].long(),
                                        scale=self.scale, logit_cap=self.cap,
                                        offset=(k1 - k0) - (r1 - r0) if self.causal else None)
                out[r0:r1], lse[r0:r1] = part
            return out, lse

    @staticmethod
    def merge_states(v, s):  # v [n, S, heads, dim], s [n, S, heads]
        assert v.is_contiguous() and s.is_contiguous() and s.dtype == torch.float32
        m = s.amax(dim=1, keepdim=True)
        w = torch.exp2(s - m)  # NaN when every state of a row is -inf, as in older kernels
        merged = (w[..., None] * v.float()).sum(1) / w.sum(1)[..., None]
        return merged.to(v.dtype), torch.log2(w.sum(1)) + m[:, 0]

    @staticmethod
    def merge_state(v_a, s_a, v_b, s_b):
        return FakeFlashInfer.merge_states(torch.stack([v_a, v_b], 1), torch.stack([s_a, s_b], 1))


@pytest.fixture
def fake_flashinfer(monkeypatch):
    from tokenlake_kernels import flashinfer_glue

    monkeypatch.setattr(flashinfer_glue, "module", lambda: FakeFlashInfer)
    return flashinfer_glue


@pytest.mark.parametrize("mode,n_seg", [("prefill", n) for n in (1, 2, 5, 8)] + [("decode", 6)])
def test_flashinfer_glue_plumbing_on_cpu(fake_flashinfer, mode, n_seg):
    n_ctx, n_q, pieces, causal, offsets = split_context(mode, n_seg, seed=n_seg)
    q, k, v, slots = make_case(n_ctx, n_q, 4, 64, torch.float32, seed=n_seg)
    segs = [slots[s:e] for s, e in pieces]
    for flags in (causal, [True] * n_seg):  # all-causal: every segment gets a general offset
        plan = fake_flashinfer.SegmentPlan(
            segs, SegmentAttention(segs, causal=flags, causal_offsets=offsets).offsets(n_q),
            n_q=n_q, q_heads=8, kv_heads=KV_HEADS, head_dim=64, head_dim_v=64,
            q_dtype=q.dtype, kv_dtype=k.dtype, scale=0.125, logit_cap=0.0, device=q.device)
        o, lse = plan.run(q, k, v)
        ref = segment_attention(q, k, v, segs, causal=flags, causal_offsets=offsets)
        close(o, ref.o, torch.float32)
        close(lse.nan_to_num(neginf=0), ref.lse.nan_to_num(neginf=0), torch.float32)
        merged = fake_flashinfer.merge_stacked(o, lse, may_be_empty=plan.has_empty_rows)
        close(merged[0],
              full_attention(q, k, v, slots, causal=True).o, torch.float32)


def test_flashinfer_glue_merge_floors_empty_states(fake_flashinfer):
    o = torch.randn(3, 4, 8, 64)
    lse = torch.randn(3, 4, 8) * 3
    lse[0] = -math.inf  # leading empty state
    lse[:, 2] = -math.inf  # a row empty everywhere
    for n in (2, 3):
        fo, flse = fake_flashinfer.merge_stacked(o[:n], lse[:n])
        ro, rlse = torch_ref.merge(o[:n], lse[:n])
        assert not torch.isnan(fo).any() and torch.equal(torch.isneginf(flse), torch.isneginf(rlse))
        close(fo, ro, torch.float32)
    plan = fake_flashinfer.SegmentPlan([torch.arange(5)], [-4], n_q=3, q_heads=8, kv_heads=2,
                                       head_dim=64, head_dim_v=64, q_dtype=torch.float32,
                                       kv_dtype=torch.float32, scale=0.1, logit_cap=0.0,
                                       device=torch.device("cpu"))
    assert plan.has_empty_rows and plan.needs_fill  # rows 0..3 of 3 see nothing: o = 0 there


def test_glue_calls_match_the_installed_flashinfer_signatures():
    import inspect

    fi = pytest.importorskip("flashinfer")
    wrapper = fi.BatchPrefillWithPagedKVCacheWrapper
    plan = list(inspect.signature(wrapper.plan).parameters)
    assert plan[1:10] == ["qo_indptr", "paged_kv_indptr", "paged_kv_indices",
                          "paged_kv_last_page_len", "num_qo_heads", "num_kv_heads", "head_dim_qk",
                          "page_size", "head_dim_vo"]
    assert {"causal", "sm_scale", "logits_soft_cap", "q_data_type", "kv_data_type"} <= set(plan)
    assert {"out", "lse", "return_lse"} <= set(inspect.signature(wrapper.run).parameters)
    assert {"kv_layout", "backend"} <= set(inspect.signature(wrapper.__init__).parameters)
    assert list(inspect.signature(fi.merge_state).parameters) == ["v_a", "s_a", "v_b", "s_b"]
    assert list(inspect.signature(fi.merge_states).parameters) == ["v", "s"]


# --- GPU: the FlashInfer path against the torch reference ------------------------------------


@pytest.fixture
def flashinfer_ready():
    from tokenlake_kernels import flashinfer_glue

    if not flashinfer_glue.available():
        pytest.skip("flashinfer does not import")


GPU_CASES = [c for c in CASES if c[3] in (1, 2, 3, 5, 8)]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("mode,group,head_dim,n_seg", GPU_CASES)
def test_flashinfer_matches_torch_reference(flashinfer_ready, mode, group, head_dim, n_seg, dtype):
    seed = case_seed(mode, group, head_dim, n_seg)
    n_ctx, n_q, pieces, causal, offsets = split_context(mode, n_seg, seed)
    q, k, v, slots = make_case(n_ctx, n_q, group, head_dim, dtype, seed, device="cuda")
    segs = [slots[s:e] for s, e in pieces]
    kw = {"causal": causal, "causal_offsets": offsets}
    fi = segment_attention(q, k, v, segs, backend="flashinfer", **kw)
    ref = segment_attention(q, k, v, segs, backend="torch", **kw)
    close(fi.o, ref.o, dtype)
    assert torch.equal(torch.isneginf(fi.lse), torch.isneginf(ref.lse))
    close(fi.lse.nan_to_num(neginf=0), ref.lse.nan_to_num(neginf=0), dtype)
    merged = SegmentAttention(segs, backend="flashinfer", **kw).merged(q, k, v)
    full = full_attention(q, k, v, slots, causal=True)
    close(merged.o, full.o, dtype)
    close(merged.lse, full.lse, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("n_states", [2, 3, 8])
def test_flashinfer_merge_matches_torch_with_empty_states(flashinfer_ready, n_states):
    g = torch.Generator().manual_seed(n_states)
    o = torch.randn(n_states, 6, 8, 128, generator=g).to("cuda", torch.bfloat16)
    lse = (torch.randn(n_states, 6, 8, generator=g) * 4).cuda()
    lse[0, :2] = -math.inf  # empty in the first state (old kernels NaN'd a leading empty)
    lse[:, 5] = -math.inf  # row 5 empty in every state
    fi = merge_stacked(o, lse, backend="flashinfer")
    ref = merge_stacked(o, lse, backend="torch")
    close(fi.o, ref.o, torch.bfloat16)
    assert torch.equal(fi.o[5], torch.zeros_like(fi.o[5])) and torch.isneginf(fi.lse[5]).all()
    close(fi.lse[:5], ref.lse[:5], torch.bfloat16)


@gpu
@needs_cuda
def test_flashinfer_empty_segments_soft_cap_and_layer_reuse(flashinfer_ready):
    layers = [make_case(PREFIX + NEW, NEW, 4, 128, torch.bfloat16, s, "cuda") for s in (1, 2)]
    slots = layers[0][3]
    segs = [slots[:0], slots[:50], slots[50:PREFIX], slots[PREFIX:], slots[:0]]
    kw = {"causal": [False, False, False, True, True], "logit_cap": 30.0}
    attn = SegmentAttention(segs, backend="flashinfer", **kw)
    for q, k, v, _ in layers:  # second layer reuses the first layer's plan
        fi = attn.run(q, k, v)
        ref = segment_attention(q, k, v, segs, backend="torch", **kw)
        close(fi.o, ref.o, torch.bfloat16)
        assert torch.isneginf(fi.lse[0]).all() and torch.isneginf(fi.lse[4]).all()
        full = full_attention(q, k, v, slots, causal=True, logit_cap=30.0)
        close(attn.merged(q, k, v).o, full.o, torch.bfloat16)
    # A row that sees nothing in the only segment: merged over FlashInfer stays finite.
    q, k, v, _ = layers[0]
    part = partial_attention(q, k, v, slots[:8], causal=True, causal_offset=-4, backend="flashinfer")
    assert torch.isneginf(part.lse[:4]).all() and not torch.isnan(part.o).any()
