"""FlashInfer glue: segment partial attention (paged prefill, return_lse) and merge-state on CUDA.

flashinfer is imported lazily (``module()``), so CPU code never needs it; its ops refuse CPU
tensors. SGLang's KV pool is FlashInfer's paged cache with page_size = 1, NHD::

    k_buffer [num_slots, kv_heads, head_dim] --unsqueeze(1)--> [num_slots, 1, kv_heads, head_dim]
    a segment's slots = its page indices; every page holds one token (last_page_len = 1)

One batch entry per (segment, block of query rows); the query is replicated per entry because
FlashInfer writes each entry's output at that entry's own query rows. FlashInfer's causal mask is
bottom-right aligned (row i of an entry with qo_len rows sees keys j <= i + kv_len - qo_len), so a
general per-segment causal offset is expressed without a custom mask by ``plan_jobs``: rows that
see no key are left out (o = 0, lse = -inf), rows that see a prefix of the segment become one
causal entry over that prefix, rows that see all of it one non-causal entry.

``SegmentPlan`` plans once (per batch) and runs per layer, like FlashInfer's wrappers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple

import torch

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended float workspace
# SGLang's FlashInfer backend pins the paged prefill wrapper to fa2 (page_size 1); do the same so
# partials match what SGLang itself would compute.
PREFILL_BACKEND = "fa2"
HEAD_DIMS = (64, 128, 256)  # compiled head dims of the FlashInfer kernels used here
DTYPES = (torch.float16, torch.bfloat16)
# Older merge kernels compute 2^((-inf) - (-inf)) = NaN when every state is empty; a finite floor
# far below any real LSE gives exactly the same weights (2^(floor - m) == 0) without the NaN.
EMPTY_LSE = -1.0e30


@functools.cache
def module() -> ModuleType | None:
    """flashinfer, or None when it is not installed or fails to import."""
    try:
        import flashinfer
    except Exception:  # ImportError, or a CUDA/JIT set-up error raised while importing
        return None
    return flashinfer


def available() -> bool:
    return module() is not None


@functools.cache
def workspace(device: torch.device) -> torch.Tensor:
    """The float workspace shared by every wrapper on ``device`` (scratch used only inside run;
    plans run one after another on one stream, so sharing is safe, as SGLang does)."""
    return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


class Job(NamedTuple):
    """One FlashInfer batch entry: query rows [row_start, row_end) of ``segment`` over its first
    ``kv_len`` keys, bottom-right causal or not."""

    segment: int
    row_start: int
    row_end: int
    kv_len: int
    causal: bool


def plan_jobs(n_q: int, seg_lens: Sequence[int], offsets: Sequence[int | None]) -> list[Job]:
    """Split each segment's masked attention into mask-free or bottom-right-causal entries.

    For segment length L and offset c (row i sees keys j <= i + c):
      rows [0, a), a = clamp(-c, 0, n_q)          see nothing: no entry;
      rows [a, b), b = clamp(L - c, a, n_q)       see keys [0, i + c]: causal over keys [0, b + c)
                                                  (bottom-right: i' + (b + c) - (b - a) = i + c);
      rows [b, n_q)                               see all L keys: non-causal.
    A one-row causal entry sees all its keys, so it is marked non-causal.
    """
    jobs: list[Job] = []
    for seg, (length, c) in enumerate(zip(seg_lens, offsets)):
        if length == 0 or n_q == 0:
            continue
        if c is None:
            jobs.append(Job(seg, 0, n_q, length, False))
            continue
        a = min(max(-c, 0), n_q)
        b = min(max(length - c, a), n_q)
        if b > a:
            jobs.append(Job(seg, a, b, b + c, b - a > 1))
        if n_q > b:
            jobs.append(Job(seg, b, n_q, length, False))
    return jobs


class _Group(NamedTuple):
    """Entries sharing one wrapper (one mask kind). ``q_index`` None: q is used as is;
    ``direct`` (start, stop): outputs land in rows [start, stop) of the flat result, else they are
    scattered to the rows ``dest``."""

    wrapper: object
    q_index: torch.Tensor | None
    direct: tuple[int, int] | None
    dest: torch.Tensor | None


class SegmentPlan:
    """A planned batch of segment partials on one device, fixed shapes; ``run`` once per layer.

    Args:
        segments: S slot tensors (int, any device; moved to ``device``), each [kv_len_s].
        offsets: S mask offsets (None = no mask, c = row i sees keys j <= i + c).
        n_q, q_heads, kv_heads, head_dim, head_dim_v: the shapes ``run`` will receive.
        q_dtype, kv_dtype: float16 / bfloat16.
        scale, logit_cap: softmax scale and soft-cap (0 = off), SGLang's layer.scaling/logit_cap.
    """

    def __init__(
        self,
        segments: Sequence[torch.Tensor],
        offsets: Sequence[int | None],
        *,
        n_q: int,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        head_dim_v: int,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        scale: float,
        logit_cap: float,
        device: torch.device,
    ) -> None:
        fi = _require()
        self.num_segments = len(segments)
        self.n_q, self.q_heads, self.head_dim_v = n_q, q_heads, head_dim_v
        self.q_dtype = q_dtype
        lens = [int(s.numel()) for s in segments]
        jobs = plan_jobs(n_q, lens, offsets)
        covered = sum((j.row_end - j.row_start) for j in jobs)
        # Rows no entry writes (empty segments, rows that see nothing) must read o = 0, lse = -inf.
        self.needs_fill = covered != self.num_segments * n_q
        # A query row that no entry covers is empty in every segment: an all-empty merge.
        reach = 0
        for start, end in sorted((j.row_start, j.row_end) for j in jobs):
            if start > reach:
                break
            reach = max(reach, end)
        self.has_empty_rows = reach < n_q
        slots = [s.to(device=device, dtype=torch.int32) for s in segments]
        self.groups: list[_Group] = []
        for causal in (False, True):
            group = [j for j in jobs if j.causal == causal]
            if not group:
                continue
            wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(
                workspace(device), "NHD", backend=PREFILL_BACKEND
            )
            qo = [j.row_end - j.row_start for j in group]
            kv = [j.kv_len for j in group]
            kwargs = {} if head_dim_v == head_dim else {"head_dim_vo": head_dim_v}
            wrapper.plan(
                _indptr(qo),
                _indptr(kv),
                torch.cat([slots[j.segment][: j.kv_len] for j in group]),
                torch.ones(len(group), dtype=torch.int32),
                q_heads,
                kv_heads,
                head_dim,
                1,  # page_size: one token per slot, as in SGLang's token_to_kv_pool
                causal=causal,
                sm_scale=scale,
                logits_soft_cap=logit_cap if logit_cap > 0 else None,
                q_data_type=q_dtype,
                kv_data_type=kv_dtype,
                **kwargs,
            )
            whole = all(j.row_start == 0 and j.row_end == n_q for j in group)
            segs = [j.segment for j in group]
            consecutive = segs == list(range(segs[0], segs[0] + len(segs)))
            q_index = None
            if not (whole and len(group) == 1):
                q_index = torch.cat(
                    [torch.arange(j.row_start, j.row_end) for j in group]
                ).to(device)
            if whole and consecutive:
                direct, dest = (segs[0] * n_q, (segs[-1] + 1) * n_q), None
            else:
                direct = None
                dest = torch.cat(
                    [torch.arange(j.row_start, j.row_end) + j.segment * n_q for j in group]
                ).to(device)
            self.groups.append(_Group(wrapper, q_index, direct, dest))

    def run(
        self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Partials of every segment for one layer.

        Args:
            q: [n_q, q_heads, head_dim] CUDA, the planned dtype.
            k_buffer: [num_slots, kv_heads, head_dim]; v_buffer: [num_slots, kv_heads, head_dim_v].

        Returns:
            o: [S, n_q, q_heads, head_dim_v] in q's dtype; lse: [S, n_q, q_heads] float32, base 2.
        """
        rows = self.num_segments * self.n_q
        alloc = torch.zeros if self.needs_fill else torch.empty
        o = alloc(rows, self.q_heads, self.head_dim_v, dtype=q.dtype, device=q.device)
        if self.needs_fill:
            lse = torch.full((rows, self.q_heads), -math.inf, dtype=torch.float32, device=q.device)
        else:
            lse = torch.empty(rows, self.q_heads, dtype=torch.float32, device=q.device)
        kv = (k_buffer.unsqueeze(1), v_buffer.unsqueeze(1))  # [slots, page_size=1, heads, dim]
        for g in self.groups:
            qg = q if g.q_index is None else q.index_select(0, g.q_index)
            if g.direct is not None:
                start, stop = g.direct
                g.wrapper.run(qg, kv, out=o[start:stop], lse=lse[start:stop], return_lse=True)
            else:
                og = torch.empty(qg.shape[0], self.q_heads, self.head_dim_v, dtype=q.dtype,
                                 device=q.device)
                lg = torch.empty(qg.shape[0], self.q_heads, dtype=torch.float32, device=q.device)
                g.wrapper.run(qg, kv, out=og, lse=lg, return_lse=True)
                o.index_copy_(0, g.dest, og)
                lse.index_copy_(0, g.dest, lg)
        shape = (self.num_segments, self.n_q, self.q_heads)
        return o.view(*shape, self.head_dim_v), lse.view(shape)


def _indptr(lengths: Sequence[int]) -> torch.Tensor:
    # Host int32: plan() reads indptrs on the host anyway and copies them to the device itself.
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out


def merge_supported(o: torch.Tensor, num_states: int) -> bool:
    """Whether FlashInfer's merge kernels take states shaped like ``o`` [.., n, heads, dim].

    They launch head_dim / vec threads per head in one block (at most 1024 threads), except
    merge_states' many-states kernel (num_states >= n), which uses a fixed 128-thread block.
    """
    if not (o.is_cuda and o.dtype in DTYPES and o.shape[-1] in HEAD_DIMS and available()):
        return False
    n, heads, dim = o.shape[-3:]
    vec = max(16 // o.element_size(), dim // 32)
    return heads * (dim // vec) <= 1024 or (num_states > 2 and num_states >= n)


def merge_stacked(
    o: torch.Tensor, lse: torch.Tensor, *, may_be_empty: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S states with FlashInfer (merge_state for 2, merge_states for more).

    Args:
        o: [S, n, heads, head_dim] float16/bfloat16 CUDA; lse: [S, n, heads] float32 base 2.
        may_be_empty: False when the caller knows no row is empty in every state, which skips
            the clean-up of all-empty rows (one pass over o).

    Returns:
        o: [n, heads, head_dim] in o's dtype; lse: [n, heads] float32.
    """
    num_states = o.shape[0]
    if num_states == 0:
        raise ValueError("merge needs at least one state")
    if num_states == 1:
        return o[0], lse[0].float()
    if num_states == 2:
        return merge_pair(o[0], lse[0], o[1], lse[1], may_be_empty=may_be_empty)
    fi = _require()
    floored = lse.float().clamp_min(EMPTY_LSE)
    # merge_states wants [n, S, heads, dim]; for decode (n = 1) this transpose is free.
    merged, merged_lse = fi.merge_states(
        o.transpose(0, 1).contiguous(), floored.transpose(0, 1).contiguous()
    )
    return _clean_empty(merged, merged_lse) if may_be_empty else (merged, merged_lse)


def merge_pair(
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    may_be_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer merge_state of two states: o [n, heads, head_dim] fp16/bf16 CUDA (same dtype),
    lse [n, heads] float32 base 2. Returns (o [n, heads, head_dim], lse [n, heads] float32)."""
    fi = _require()
    merged, merged_lse = fi.merge_state(
        o_a.contiguous(),
        lse_a.float().clamp_min(EMPTY_LSE).contiguous(),
        o_b.contiguous(),
        lse_b.float().clamp_min(EMPTY_LSE).contiguous(),
    )
    return _clean_empty(merged, merged_lse) if may_be_empty else (merged, merged_lse)


def _clean_empty(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Rows empty in every state merged at the floor: give them the exact empty state back.
    empty = lse <= EMPTY_LSE / 2
    return o.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, -math.inf)


def _require() -> ModuleType:
    fi = module()
    if fi is None:
        raise RuntimeError("flashinfer is not importable")
    return fi
