"""Segment attention and merge-state in plain torch: the exact reference (CPU or CUDA).

One SGLang layer's KV pool, NHD, and one segment of it::

    k_buffer  [num_slots, kv_heads, head_dim]     v_buffer  [num_slots, kv_heads, head_dim_v]
                   ^  ^           ^
    slots  int64 [kv_len]  = rows of the buffers, in sequence order (need not be contiguous)

    q  [n_q, q_heads, head_dim]   q_heads = kv_heads * group; query head h reads kv head h // group

Logit of query row i and key j:  s = scale * q_i . k_j, then ``cap * tanh(s / cap)`` when cap > 0.
Mask: ``offset`` None lets every row see every key; an int c lets row i see local keys j <= i + c
(c = kv_len - n_q is FlashInfer's bottom-right causal mask). A row that sees no key is "empty":
o = 0 and lse = -inf.

Every result is an attention state (o, lse) with lse = log2(sum_j exp(s_j)) (base 2, FlashInfer's
convention), float32. Scores and sums are accumulated in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)

# Upper bound on float32 scores held at once (query rows x heads x keys): 2^26 = 256 MiB. Long
# contexts are processed a block of query rows at a time so the reference also fits on a GPU.
MAX_SCORES = 1 << 26


def attend(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,
    *,
    scale: float,
    offset: int | None = None,
    logit_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the keys at ``slots``: one partial state.

    Args:
        q: [n_q, q_heads, head_dim], any float dtype.
        k_buffer: [num_slots, kv_heads, head_dim]; v_buffer: [num_slots, kv_heads, head_dim_v].
        slots: int64 [kv_len] on the buffers' device; may be empty.
        scale: softmax scale applied to q.k before the soft-cap.
        offset: None (no mask) or c: row i sees keys j <= i + c.
        logit_cap: soft-cap value; 0 disables it.

    Returns:
        o: [n_q, q_heads, head_dim_v] in q's dtype; lse: [n_q, q_heads] float32, base 2.
    """
    n_q, q_heads, head_dim = q.shape
    kv_heads, head_dim_v = k_buffer.shape[1], v_buffer.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    group = q_heads // kv_heads
    kv_len = int(slots.numel())
    o = torch.zeros(n_q, q_heads, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((n_q, q_heads), -math.inf, dtype=torch.float32, device=q.device)
    if kv_len == 0 or n_q == 0:
        return o.to(q.dtype), lse
    slots = slots.to(device=k_buffer.device, dtype=torch.long)
    k = k_buffer.index_select(0, slots).float()  # [kv_len, kv_heads, head_dim]
    v = v_buffer.index_select(0, slots).float()
    cols = torch.arange(kv_len, device=q.device)
    rows_per_block = max(1, MAX_SCORES // (q_heads * kv_len))
    for r0 in range(0, n_q, rows_per_block):
        r1 = min(n_q, r0 + rows_per_block)
        qb = q[r0:r1].float().reshape(r1 - r0, kv_heads, group, head_dim)
        s = torch.einsum("nhgd,lhd->hgnl", qb, k) * scale  # [kv_heads, group, rows, kv_len]
        if logit_cap > 0:
            s = logit_cap * torch.tanh(s / logit_cap)
        if offset is not None:
            rows = torch.arange(r0, r1, device=q.device)
            s = s.masked_fill(cols[None, :] > rows[:, None] + offset, -math.inf)
        lse_e = torch.logsumexp(s, dim=-1)  # natural log; -inf on empty rows
        # Empty rows: subtract 0 instead of -inf so exp(-inf - 0) = 0 and o stays 0 (no NaN).
        shift = torch.where(torch.isfinite(lse_e), lse_e, torch.zeros_like(lse_e))
        p = torch.exp(s - shift[..., None])
        ob = torch.einsum("hgnl,lhd->nhgd", p, v)
        o[r0:r1] = ob.reshape(r1 - r0, q_heads, head_dim_v)
        lse[r0:r1] = (lse_e * LOG2E).permute(2, 0, 1).reshape(r1 - r0, q_heads)
    return o.to(q.dtype), lse


def merge(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S attention states of the same queries over disjoint key sets.

    Base 2: m = max_s lse_s, w_s = 2^(lse_s - m), o = sum w_s o_s / sum w_s,
    lse = m + log2(sum w_s). Rows where every state is empty (-inf) give o = 0, lse = -inf.

    Args:
        o: [S, n, heads, head_dim_v], any float dtype; S >= 1.
        lse: [S, n, heads], base 2 (cast to float32).

    Returns:
        o: [n, heads, head_dim_v] in o's dtype; lse: [n, heads] float32.
    """
    if o.shape[0] == 0:
        raise ValueError("merge needs at least one state")
    lse = lse.float()
    m = lse.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp2(lse - m)  # 0 for empty states
    total = w.sum(dim=0)
    # An empty state's o carries weight 0; masking (rather than multiplying) keeps a NaN/inf
    # left in an empty state's o from leaking into the sum.
    weighted = torch.where(w[..., None] > 0, w[..., None] * o.float(), 0.0)
    merged = weighted.sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    return merged.to(o.dtype), m + torch.log2(total)
