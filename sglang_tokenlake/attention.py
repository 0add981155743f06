"""Segment partial attention with LSE, and merge-state: the piecewise attention of TokenLake.

Each segment owner attends the query to its own segments and returns (o, lse); the requester
merges the partials, which equals one attention over all the keys. Over one SGLang layer's KV
pool (NHD, GQA)::

    q         [n_q, q_heads, head_dim]              q_heads = kv_heads * group
    k_buffer  [num_slots, kv_heads, head_dim]       v_buffer [num_slots, kv_heads, head_dim_v]
    segment   int64 slots [kv_len] into the buffers, in sequence order

    partial   o [n_q, q_heads, head_dim_v] (q's dtype), lse [n_q, q_heads] float32,
              lse = log2(sum_j exp(s_j))  -- base 2, FlashInfer's convention
    s_j       = scale * q.k_j, then cap * tanh(s_j / cap) when logit_cap > 0 (SGLang's
              layer.scaling and layer.logit_cap)

Masks: a non-causal segment is seen whole by every query row (prefix segments). A causal segment
with offset c lets query row i see its keys j <= i + c, i.e. c = (position of query row 0) -
(position of the segment's first key); the default c = kv_len - n_q is the block of new tokens
attending causally to itself at the end of the keys given. A row that sees no key of a segment
(or an empty segment) gets o = 0, lse = -inf; merging only such states gives the same, no NaN.

Backends: "torch" (reference, CPU or CUDA, float32 accumulation) and "flashinfer" (CUDA,
float16/bfloat16, head_dim 64/128/256); "auto" picks FlashInfer when it applies and imports.
flashinfer is imported only then, so CPU use never needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from tokenlake_kernels import flashinfer_glue, torch_ref

Backend = Literal["auto", "torch", "flashinfer"]
Slots = torch.Tensor | Sequence[int]


class AttentionState(NamedTuple):
    """An attention state: o in the query's dtype, lse float32 base 2 (-inf = saw no key).

    For one segment o is [n_q, q_heads, head_dim_v] and lse [n_q, q_heads]; batched forms add a
    leading segment axis: o [S, n_q, q_heads, head_dim_v], lse [S, n_q, q_heads].
    """

    o: torch.Tensor
    lse: torch.Tensor


def resolve_backend(backend: Backend, *tensors: torch.Tensor) -> Literal["torch", "flashinfer"]:
    """"torch" or "flashinfer" for these tensors (q/k/v or states: [..., heads, head_dim]).

    "auto" gives FlashInfer when every tensor is CUDA float16/bfloat16 with a compiled head dim
    and flashinfer imports; "flashinfer" raises ValueError when that does not hold.
    """
    if backend == "torch":
        return "torch"
    if backend not in ("auto", "flashinfer"):
        raise ValueError(f"unknown backend {backend!r}")
    reason = None
    if not all(t.is_cuda for t in tensors):
        reason = "tensors are not on a CUDA device"
    elif not all(t.dtype in flashinfer_glue.DTYPES for t in tensors):
        reason = "FlashInfer takes float16/bfloat16 only"
    elif not all(t.shape[-1] in flashinfer_glue.HEAD_DIMS for t in tensors):
        reason = f"head_dim not in {flashinfer_glue.HEAD_DIMS}"
    elif not flashinfer_glue.available():  # first import happens here, on CUDA only
        reason = "flashinfer does not import"
    if reason is None:
        return "flashinfer"
    if backend == "flashinfer":
        raise ValueError(f"backend='flashinfer' unavailable: {reason}")
    return "torch"


class SegmentAttention:
    """Partial attention of one query block over S segments: plan once, ``run`` per layer.

    Args:
        segments: S slot lists, each int64 [kv_len_s] (a list of ints is accepted); may be empty.
        causal: one flag for all segments or one per segment.
        causal_offsets: per segment, the offset c of a causal segment (row i sees keys j <= i + c),
            or None for the default kv_len_s - n_q; ignored for non-causal segments.
        scale: softmax scale; None means 1 / sqrt(head_dim).
        logit_cap: soft-cap; 0 disables it.
        backend: "auto", "torch" or "flashinfer".

    The FlashInfer plan is built on the first ``run`` and reused while the shapes, dtypes and
    device stay the same (every layer of a forward pass).
    """

    def __init__(
        self,
        segments: Sequence[Slots],
        *,
        causal: bool | Sequence[bool] = False,
        causal_offsets: Sequence[int | None] | None = None,
        scale: float | None = None,
        logit_cap: float = 0.0,
        backend: Backend = "auto",
    ) -> None:
        self.segments = [_as_slots(s) for s in segments]
        n = len(self.segments)
        self.causal = [bool(causal)] * n if isinstance(causal, bool) else [bool(c) for c in causal]
        self.causal_offsets = list(causal_offsets) if causal_offsets is not None else [None] * n
        if len(self.causal) != n or len(self.causal_offsets) != n:
            raise ValueError("causal / causal_offsets need one entry per segment")
        self.scale = scale
        self.logit_cap = float(logit_cap)
        self.backend = backend
        self._plan: flashinfer_glue.SegmentPlan | None = None
        self._plan_key: tuple | None = None
        self._ran_flashinfer = False

    def offsets(self, n_q: int) -> list[int | None]:
        """Mask offset per segment for ``n_q`` query rows: None (sees all) or c."""
        return [
            None if not causal else (int(s.numel()) - n_q if c is None else int(c))
            for s, causal, c in zip(self.segments, self.causal, self.causal_offsets)
        ]

    def run(
        self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor
    ) -> AttentionState:
        """Partials of every segment.

        Args:
            q: [n_q, q_heads, head_dim]. k_buffer: [num_slots, kv_heads, head_dim].
            v_buffer: [num_slots, kv_heads, head_dim_v]. All on one device.

        Returns:
            o [S, n_q, q_heads, head_dim_v] in q's dtype, lse [S, n_q, q_heads] float32 base 2.
        """
        _check_shapes(q, k_buffer, v_buffer)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        offsets = self.offsets(q.shape[0])
        self._ran_flashinfer = resolve_backend(self.backend, q, k_buffer, v_buffer) == "flashinfer"
        if self._ran_flashinfer:
            return AttentionState(*self._flashinfer_plan(q, k_buffer, v_buffer, scale).run(
                q, k_buffer, v_buffer))
        parts = [
            torch_ref.attend(q, k_buffer, v_buffer, s, scale=scale, offset=c,
                             logit_cap=self.logit_cap)
            for s, c in zip(self.segments, offsets)
        ]
        if not parts:
            n_q, heads = q.shape[:2]
            return AttentionState(
                q.new_zeros(0, n_q, heads, v_buffer.shape[-1]),
                torch.zeros(0, n_q, heads, dtype=torch.float32, device=q.device),
            )
        return AttentionState(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))

    def merged(
        self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor
    ) -> AttentionState:
        """``run`` then merge: attention over the union of the segments (shapes as ``run`` minus
        the segment axis). Needs at least one segment."""
        o, lse = self.run(q, k_buffer, v_buffer)
        if self._ran_flashinfer and flashinfer_glue.merge_supported(o, o.shape[0]):
            assert self._plan is not None
            # The plan knows whether some query row is empty in every segment; if none is, the
            # clean-up pass over o for all-empty rows is skipped.
            return AttentionState(*flashinfer_glue.merge_stacked(
                o, lse, may_be_empty=self._plan.has_empty_rows))
        return AttentionState(*torch_ref.merge(o, lse))

    def _flashinfer_plan(
        self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, scale: float
    ) -> flashinfer_glue.SegmentPlan:
        key = (tuple(q.shape), tuple(k_buffer.shape[1:]), v_buffer.shape[-1], q.dtype,
               k_buffer.dtype, q.device, scale)
        if self._plan is None or key != self._plan_key:
            self._plan = flashinfer_glue.SegmentPlan(
                self.segments,
                self.offsets(q.shape[0]),
                n_q=q.shape[0],
                q_heads=q.shape[1],
                kv_heads=k_buffer.shape[1],
                head_dim=q.shape[2],
                head_dim_v=v_buffer.shape[2],
                q_dtype=q.dtype,
                kv_dtype=k_buffer.dtype,
                scale=scale,
                logit_cap=self.logit_cap,
                device=q.device,
            )
            self._plan_key = key
        return self._plan


def partial_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: Slots,
    *,
    causal: bool = False,
    causal_offset: int | None = None,
    scale: float | None = None,
    logit_cap: float = 0.0,
    backend: Backend = "auto",
) -> AttentionState:
    """Attention of ``q`` over one segment, with its LSE.

    Args:
        q: [n_q, q_heads, head_dim]. k_buffer: [num_slots, kv_heads, head_dim].
        v_buffer: [num_slots, kv_heads, head_dim_v]. slots: int64 [kv_len] (may be empty).
        causal / causal_offset / scale / logit_cap / backend: as in ``SegmentAttention``.

    Returns:
        o [n_q, q_heads, head_dim_v] in q's dtype, lse [n_q, q_heads] float32 base 2.
    """
    o, lse = SegmentAttention(
        [slots], causal=causal, causal_offsets=[causal_offset], scale=scale,
        logit_cap=logit_cap, backend=backend,
    ).run(q, k_buffer, v_buffer)
    return AttentionState(o[0], lse[0])


def segment_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    segments: Sequence[Slots],
    *,
    causal: bool | Sequence[bool] = False,
    causal_offsets: Sequence[int | None] | None = None,
    scale: float | None = None,
    logit_cap: float = 0.0,
    backend: Backend = "auto",
) -> AttentionState:
    """Per-segment partials in one call (one FlashInfer launch per mask kind).

    Returns o [S, n_q, q_heads, head_dim_v] in q's dtype, lse [S, n_q, q_heads] float32 base 2.
    Arguments as in ``SegmentAttention`` and ``SegmentAttention.run``.
    """
    return SegmentAttention(
        segments, causal=causal, causal_offsets=causal_offsets, scale=scale,
        logit_cap=logit_cap, backend=backend,
    ).run(q, k_buffer, v_buffer)


def full_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: Slots,
    *,
    causal: bool = False,
    causal_offset: int | None = None,
    scale: float | None = None,
    logit_cap: float = 0.0,
) -> AttentionState:
    """The reference: one torch attention (float32 accumulation) over all ``slots``.

    Shapes and arguments as in ``partial_attention``; what split + merge must reproduce.
    """
    return partial_attention(
        q, k_buffer, v_buffer, slots, causal=causal, causal_offset=causal_offset,
        scale=scale, logit_cap=logit_cap, backend="torch",
    )


def merge_state(
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> AttentionState:
    """Merge two states of the same queries over disjoint keys.

    Args:
        o_a, o_b: [n, heads, head_dim_v], one dtype. lse_a, lse_b: [n, heads], base 2.

    Returns:
        o [n, heads, head_dim_v] in o_a's dtype, lse [n, heads] float32 (two empties: 0, -inf).
    """
    if _merge_backend(backend, o_a, 2) == "flashinfer":
        return AttentionState(*flashinfer_glue.merge_pair(o_a, lse_a, o_b, lse_b))
    return AttentionState(*torch_ref.merge(torch.stack([o_a, o_b]), torch.stack([lse_a, lse_b])))


def merge_states(
    states: Sequence[tuple[torch.Tensor, torch.Tensor]], *, backend: Backend = "auto"
) -> AttentionState:
    """Merge any number (>= 1) of states (o [n, heads, head_dim_v], lse [n, heads]).

    Returns o [n, heads, head_dim_v] in the states' dtype, lse [n, heads] float32 base 2.
    """
    if not states:
        raise ValueError("merge_states needs at least one state")
    return merge_stacked(
        torch.stack([s[0] for s in states]), torch.stack([s[1].float() for s in states]),
        backend=backend,
    )


def merge_stacked(
    o: torch.Tensor, lse: torch.Tensor, *, backend: Backend = "auto"
) -> AttentionState:
    """Merge states stacked on a leading axis, as ``SegmentAttention.run`` returns them.

    Args:
        o: [S, n, heads, head_dim_v] (S >= 1); lse: [S, n, heads] base 2.

    Returns:
        o [n, heads, head_dim_v] in o's dtype, lse [n, heads] float32 base 2.
    """
    if o.shape[0] == 0:
        raise ValueError("merge needs at least one state")
    if _merge_backend(backend, o, o.shape[0]) == "flashinfer":
        return AttentionState(*flashinfer_glue.merge_stacked(o, lse))
    return AttentionState(*torch_ref.merge(o, lse))


def _merge_backend(backend: Backend, o: torch.Tensor, num_states: int) -> str:
    chosen = resolve_backend(backend, o)
    if chosen == "flashinfer" and not flashinfer_glue.merge_supported(o, num_states):
        if backend == "flashinfer":
            raise ValueError("FlashInfer merge kernels cannot launch for this many heads")
        return "torch"
    return chosen


def _as_slots(slots: Slots) -> torch.Tensor:
    if isinstance(slots, torch.Tensor):
        if slots.dtype.is_floating_point or slots.dtype == torch.bool or slots.dim() != 1:
            raise ValueError("slots must be a 1-D integer tensor")
        return slots
    return torch.tensor(list(slots), dtype=torch.long)


def _check_shapes(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> None:
    if q.dim() != 3 or k_buffer.dim() != 3 or v_buffer.dim() != 3:
        raise ValueError("q, k_buffer, v_buffer must be [tokens, heads, head_dim]")
    if q.shape[2] != k_buffer.shape[2] or k_buffer.shape[:2] != v_buffer.shape[:2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_buffer.shape)}, "
                         f"v {tuple(v_buffer.shape)}")
    if q.shape[1] % k_buffer.shape[1]:
        raise ValueError(f"q_heads {q.shape[1]} is not a multiple of kv_heads {k_buffer.shape[1]}")
    if not (q.device == k_buffer.device == v_buffer.device):
        raise ValueError("q, k_buffer, v_buffer must be on one device")
