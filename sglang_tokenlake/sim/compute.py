"""The simulator's GPU cost model: a fixed roofline per instance.

One instance is one A100-80GB-class GPU serving a Llama-3-8B-like model (GQA,
32 layers, 32 query / 8 KV heads of 128, bf16). Defaults come from
``ComputeModel.roofline()``::

    prefill_s(new, ctx)  = a * new + b * new * (ctx + new / 2)
        a = 2 * params / (peak_flops * mfu)                   linear layers, per token
        b = 4 * layers * q_heads * head_dim / (peak_flops * mfu)
                                                              QK^T and PV, per (query, key) pair
    one decode step      = t_w + c * (KV tokens read by the batch)
        t_w = params * dtype_bytes / (hbm_Bps * mbu)           weights, once per step
        c   = 2 * layers * kv_heads * head_dim * dtype_bytes / (hbm_Bps * mbu)
    decode_work_s(out, ctx, batch) = out * (t_w / batch + c * (ctx + out / 2))
        a request's share of the GPU over its decode steps (weights amortized over the batch)

    batch = min(requests in flight on the instance, max_batch, kv_capacity_tokens / ctx)

With 312 TFLOP/s at 50% MFU and 2.0 TB/s at 70% MBU: a = 1.03e-4 s/token
(~9.7K prefill tokens/s), b = 3.4e-9 s, t_w = 11.4 ms, c = 9.4e-8 s/token; 80 GB of
HBM less 16 GB of weights holds 488K KV tokens (default rounded down to 450K).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ComputeModel:
    prefill_s_per_token: float = 1.026e-4
    """a: seconds per prefilled token (linear layers)."""
    attn_s_per_token_pair: float = 3.36e-9
    """b: seconds per (query token x attended token) of prefill attention."""
    decode_step_s: float = 0.0114
    """t_w: seconds per decode step to read the weights, shared by the batch."""
    decode_s_per_ctx_token: float = 9.36e-8
    """c: seconds per decode step per KV token read."""
    max_batch: int = 256
    """Largest decode batch the weights are amortized over."""
    kv_capacity_tokens: int = 450_000
    """KV tokens the GPU can hold for running requests (80 GB - 16 GB of weights, at
    128 KiB per token): a batch of requests of ``ctx`` tokens holds at most this / ctx."""

    @classmethod
    def roofline(cls, params: float = 8.0e9, layers: int = 32, q_heads: int = 32,
                 kv_heads: int = 8, head_dim: int = 128, dtype_bytes: int = 2,
                 peak_flops: float = 312e12, mfu: float = 0.5, hbm_Bps: float = 2.0e12,
                 mbu: float = 0.7, max_batch: int = 256,
                 hbm_bytes: float = 80e9) -> ComputeModel:
        """Constants from hardware and model numbers (see the module docstring)."""
        flops = peak_flops * mfu
        bw = hbm_Bps * mbu
        return cls(
            prefill_s_per_token=2 * params / flops,
            attn_s_per_token_pair=4 * layers * q_heads * head_dim / flops,
            decode_step_s=params * dtype_bytes / bw,
            decode_s_per_ctx_token=2 * layers * kv_heads * head_dim * dtype_bytes / bw,
            max_batch=max_batch,
            kv_capacity_tokens=int((hbm_bytes - params * dtype_bytes)
                                   / (2 * layers * kv_heads * head_dim * dtype_bytes)),
        )

    def batch(self, batch: int, ctx: int) -> int:
        """The decode batch a request of ``ctx`` tokens shares: ``batch`` capped by
        ``max_batch`` and by how many such requests fit in KV memory."""
        return max(1, min(batch, self.max_batch, self.kv_capacity_tokens // max(ctx, 1)))

    def prefill_s(self, new: int, ctx: int) -> float:
        """GPU seconds to prefill ``new`` tokens after ``ctx`` cached tokens held locally."""
        return new * (self.prefill_s_per_token + self.attn_s_per_token_pair * (ctx + new / 2))

    def remote_attn_s(self, query_tokens: int, decode_steps: int, tokens: int) -> float:
        """Owner GPU seconds for partial attention over ``tokens`` cached tokens it holds:
        ``query_tokens`` prefill queries, then one query per decode step."""
        return (self.attn_s_per_token_pair * query_tokens * tokens
                + self.decode_s_per_ctx_token * decode_steps * tokens)

    def decode_work_s(self, out: int, ctx: int, batch: int) -> float:
        """GPU seconds a request's ``out`` decode steps take, its share of a ``batch``."""
        b = self.batch(batch, ctx + out)
        return out * (self.decode_step_s / b + self.decode_s_per_ctx_token * (ctx + out / 2))

    def tpot_s(self, ctx: int, batch: int) -> float:
        """Seconds per output token in a batch of ``batch`` requests of about ``ctx`` tokens."""
        b = self.batch(batch, ctx)
        return self.decode_step_s + self.decode_s_per_ctx_token * ctx * b
