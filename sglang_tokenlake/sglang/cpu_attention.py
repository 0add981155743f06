"""``--attention-backend torch_native_extend``: SGLang's torch_native backend with an
extend pass that computes only the new tokens' queries.

SGLang's ``torch_native`` backend (the one that serves on CPU without AMX) runs each
request of an extend pass as one causal attention over the *whole* sequence: it
pads the new tokens' queries with a query row per cached prefix token, computes all
of them and keeps the last rows. An extend after a cached prefix of P tokens costs
as much attention as prefilling all P + E tokens, so on CPU a prefix hit saves the
prefix's projections and MLPs but none of its attention; with long contexts and a
small model that is most of a prefill. GPU backends (FlashInfer, FlashAttention)
compute the E new queries against the P + E keys, and so does this backend: each
query row attends to the keys at or before its own position (a boolean mask with
its diagonal at P), which is the row the padded computation kept. A request with
nothing cached is computed exactly as ``torch_native`` computes it; a request's new
rows after a cached prefix agree with the rows of the same positions computed
without the cache to float32 rounding (the attention kernel blocks rows by the
number of queries), as on GPU backends (``tests/test_cpu_attention.py``). Decode,
sliding windows and cross attention are ``torch_native``'s own.

The plugin registers it in every SGLang process (``plugin.register``); it is opt-in,
chosen like any backend, on any model the torch_native backend serves. The benchmark harness runs every configuration, stock
ones included, with it (``cluster.CPU_FLAGS``): a cached prefix then saves on CPU
what it saves on a GPU.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from torch.nn.functional import scaled_dot_product_attention

NAME = "torch_native_extend"


class ExtendOnlyAttnBackend(TorchNativeAttnBackend):
    """``torch_native`` whose extend pass computes only the new tokens' queries."""

    def _run_sdpa_forward_extend(self, query: torch.Tensor, output: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                                 seq_lens: torch.Tensor, extend_prefix_lens: torch.Tensor,
                                 extend_seq_lens: torch.Tensor,
                                 encoder_lens: Optional[torch.Tensor] = None, scaling: Any = None,
                                 enable_gqa: bool = False, causal: bool = False,
                                 is_cross_attn: bool = False,
                                 sliding_window_size: Optional[int] = None) -> torch.Tensor:
        if encoder_lens is not None or (sliding_window_size is not None and sliding_window_size > -1):
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                extend_prefix_lens, extend_seq_lens, encoder_lens, scaling, enable_gqa, causal,
                is_cross_attn, sliding_window_size)
        query = query.movedim(0, query.dim() - 2)  # [heads, tokens, dim]
        start_q = 0
        for i in range(seq_lens.shape[0]):
            n_new, n_cached, n_kv = int(extend_seq_lens[i]), int(extend_prefix_lens[i]), int(seq_lens[i])
            slots = req_to_token[req_pool_indices[i], :n_kv]
            k = k_cache[slots].movedim(0, query.dim() - 2)
            v = v_cache[slots].movedim(0, query.dim() - 2)
            if not (query.dtype == k.dtype == v.dtype):
                k, v = k.to(query.dtype), v.to(query.dtype)
            q = query[:, start_q : start_q + n_new, :]
            mask, is_causal = None, causal
            if causal and n_cached > 0:  # row r is position n_cached + r: keys 0..n_cached + r
                mask = torch.ones(n_new, n_kv, dtype=torch.bool, device=q.device).tril(n_cached)
                is_causal = False
            out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                               attn_mask=mask, enable_gqa=enable_gqa,
                                               scale=scaling, is_causal=is_causal)
            output[start_q : start_q + n_new] = out.squeeze(0).movedim(query.dim() - 2, 0)
            start_q += n_new
        return output

