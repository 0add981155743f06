"""CPU stand-in for ``sgl_kernel`` (installed by ``tokenlake-install-patch`` on hosts without CUDA).

The PyPI ``sglang-kernel`` wheel is CUDA-only: importing it fails on a CPU host,
and SGLang's CPU engine imports it for one helper. This module provides that
helper in plain torch and refuses everything else with a clear error, so a
missing op is never silently replaced by something wrong.
"""

from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+tokenlake.cpu"
TOKENLAKE_CPU_SHIM = True


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's new KV slots into its ``req_to_token`` row.

    For batch entry ``i``: ``req_to_token[req_pool_indices[i], start[i]:end[i]]``
    takes the next ``end[i] - start[i]`` values of ``out_cache_loc`` (entries are
    laid out back to back in batch order).
    """
    del pool_len  # the row length is req_to_token.shape[1]
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    pos = 0
    for row, s, e in zip(rows, starts, ends):
        n = e - s
        if n <= 0:
            continue
        req_to_token[row, s:e] = out_cache_loc[pos : pos + n].to(req_to_token.dtype)
        pos += n


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Copy KV rows ``src_loc[i] -> tgt_loc[i]`` in every layer buffer.

    ``data_ptrs[b]`` is the base address of contiguous CPU buffer ``b`` and
    ``strides[b]`` its row size in bytes. All source rows are read before any
    target row is written, so overlapping moves behave like one parallel copy.
    """
    srcs = src_loc.tolist()
    tgts = tgt_loc.tolist()
    if not srcs:
        return
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        ptr, stride = int(ptr), int(stride)
        rows = [ctypes.string_at(ptr + s * stride, stride) for s in srcs]
        for t, row in zip(tgts, rows):
            ctypes.memmove(ptr + t * stride, row, stride)


PROVIDED = ("assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu")


def _unavailable(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this host runs the TokenLake CPU "
            f"stand-in for sgl_kernel, which provides only {', '.join(PROVIDED)}. "
            "Run on a CUDA host with the real sglang-kernel, or choose CPU-capable "
            "options (--device cpu --attention-backend torch_native_extend "
            "--sampling-backend pytorch)."
        )

    op.__name__ = name
    return op


def __getattr__(name: str):
    # SGLang's CPU engine imports some CPU ops at module load and calls them only
    # on paths this stand-in does not serve (speculative decoding, MoE, ...).
    # The import succeeds; a call raises with the reason.
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)
