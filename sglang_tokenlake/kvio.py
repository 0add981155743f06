"""Segment KV between SGLang's KV pool and wire buffers (torch).

A segment's KV travels as one contiguous buffer of the pool's storage dtype::

    [ 2 (K, V) | layers | segment_size tokens | kv_heads | head_dim ]

gathered from / scattered into the per-layer buffers ``k_buffer[l]`` /
``v_buffer[l]`` (``[slots, kv_heads, head_dim]``, NHD) of an MHA KV pool. The
layout fingerprint (``KVLayout.fingerprint``) must match between workers of a
pool; a buffer of the wrong size is refused before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: str

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * (self.head_dim + self.v_head_dim) * self.itemsize

    @property
    def fingerprint(self) -> str:
        return f"mha:l{self.layers}:h{self.kv_heads}:d{self.head_dim}:v{self.v_head_dim}:{self.dtype}"


def layout_of(kvcache: Any) -> KVLayout:
    """The layout of an MHA KV pool; raises for pools TokenLake cannot move (MLA, HND, ...)."""
    k = getattr(kvcache, "k_buffer", None)
    v = getattr(kvcache, "v_buffer", None)
    if not isinstance(k, list) or not isinstance(v, list) or not k:
        raise ValueError(
            f"{type(kvcache).__name__} is not an MHA KV pool with per-layer k/v buffers; "
            "pooling KV across workers needs one"
        )
    if getattr(kvcache, "use_hnd", False):
        raise ValueError("pooling KV needs the NHD KV layout (unset SGLANG_USE_HND_KVCACHE)")
    if k[0].dim() != 3 or v[0].dim() != 3:
        raise ValueError(f"unexpected KV buffer shape {tuple(k[0].shape)}")
    dtype = str(k[0].dtype).replace("torch.", "")
    return KVLayout(len(k), k[0].shape[1], k[0].shape[2], v[0].shape[2], dtype)


def gather(kvcache: Any, slots: torch.Tensor) -> torch.Tensor:
    """KV of ``slots`` (int64, n) as a contiguous CPU uint8 tensor (see module doc):
    each layer's rows are selected straight into their place in the buffer."""
    k0, v0 = kvcache.k_buffer[0], kvcache.v_buffer[0]
    idx = slots.to(device=k0.device, dtype=torch.int64)
    n, L = idx.numel(), len(kvcache.k_buffer)
    k_part = L * n * k0.shape[1] * k0.shape[2]
    flat = torch.empty(k_part + L * n * v0.shape[1] * v0.shape[2], dtype=k0.dtype, device=k0.device)
    ks = flat[:k_part].view(L, n, k0.shape[1], k0.shape[2])
    vs = flat[k_part:].view(L, n, v0.shape[1], v0.shape[2])
    for layer in range(L):
        torch.index_select(kvcache.k_buffer[layer], 0, idx, out=ks[layer])
        torch.index_select(kvcache.v_buffer[layer], 0, idx, out=vs[layer])
    return flat.cpu().view(torch.uint8)


def scatter(kvcache: Any, slots: torch.Tensor, data: torch.Tensor, layout: KVLayout) -> None:
    """Write the KV in ``data`` (uint8, as produced by ``gather``) into ``slots``."""
    n = slots.numel()
    want = n * layout.bytes_per_token()
    if data.numel() != want:
        raise ValueError(f"KV buffer has {data.numel()} bytes, {n} tokens need {want}")
    dt = getattr(torch, layout.dtype)
    dev = kvcache.k_buffer[0].device
    typed = data.view(dt)
    L, H, D, Dv = layout.layers, layout.kv_heads, layout.head_dim, layout.v_head_dim
    k_part = typed[: L * n * H * D].view(L, n, H, D).to(dev)
    v_part = typed[L * n * H * D :].view(L, n, H, Dv).to(dev)
    idx = slots.to(device=dev, dtype=torch.int64)
    for layer in range(L):
        kvcache.k_buffer[layer].index_copy_(0, idx, k_part[layer])
        kvcache.v_buffer[layer].index_copy_(0, idx, v_part[layer])


def merge_runs(values: list[Any], segment_size: int) -> list[torch.Tensor]:
    """Slices of the slot runs ``(base, start)``, merging runs that continue each other.

    A segment's slots are ``base[start : start + segment_size]``; the segments
    inserted together share one ``base``, so a path usually merges into one slice.
    """
    out: list[torch.Tensor] = []
    base: Optional[torch.Tensor] = None
    lo = hi = 0
    for b, start in values:
        if b is base and start == hi:
            hi += segment_size
            continue
        if base is not None:
            out.append(base[lo:hi])
        base, lo, hi = b, start, start + segment_size
    if base is not None:
        out.append(base[lo:hi])
    return out
