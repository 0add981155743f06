"""``--attention-backend torch_native_extend``: only the new tokens' queries, the same outputs."""

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402

from sglang_tokenlake.sglang.cpu_attention import NAME, ExtendOnlyAttnBackend  # noqa: E402


def _batch(lens, q_heads=4, kv_heads=2, dim=16, slots=16384, seed=0):
    """An extend batch of requests with (cached prefix, new tokens) ``lens``, their KV
    scattered over random slots of a KV buffer."""
    g = torch.Generator().manual_seed(seed)
    n_new = sum(e for _, e in lens)
    k_cache = torch.randn(slots, kv_heads, dim, generator=g)
    v_cache = torch.randn(slots, kv_heads, dim, generator=g)
    width = max(p + e for p, e in lens)
    req_to_token = torch.zeros(len(lens), width, dtype=torch.int64)
    perm = torch.randperm(slots, generator=g)
    at = 0
    for i, (p, e) in enumerate(lens):
        req_to_token[i, : p + e] = perm[at : at + p + e]
        at += p + e
    return dict(
        query=torch.randn(n_new, q_heads, dim, generator=g),
        k_cache=k_cache, v_cache=v_cache, req_to_token=req_to_token,
        req_pool_indices=torch.arange(len(lens)),
        seq_lens=torch.tensor([p + e for p, e in lens]),
        extend_prefix_lens=torch.tensor([p for p, _ in lens]),
        extend_seq_lens=torch.tensor([e for _, e in lens]),
    )


def _run(cls, batch, **kw):
    backend = object.__new__(cls)  # the extend kernel needs no model runner
    out = torch.full_like(batch["query"], float("nan"))
    return backend._run_sdpa_forward_extend(
        batch["query"], out, batch["k_cache"], batch["v_cache"], batch["req_to_token"],
        batch["req_pool_indices"], batch["seq_lens"], batch["extend_prefix_lens"],
        batch["extend_seq_lens"], None, scaling=0.25, enable_gqa=True, **kw)


def test_a_request_with_nothing_cached_is_torch_natives_computation_bit_for_bit():
    batch = _batch([(0, 37), (0, 300), (0, 1)])
    want = _run(TorchNativeAttnBackend, batch, causal=True)
    assert torch.equal(_run(ExtendOnlyAttnBackend, batch, causal=True), want)


@pytest.mark.parametrize("lens", [
    [(64, 9), (0, 20), (1200, 33)],  # hits and a miss in one pass
    [(4096, 70), (5632, 16), (255, 1)],  # long cached prefixes, short questions
])
def test_new_rows_after_a_cached_prefix_are_torch_natives_rows(lens):
    batch = _batch(lens)
    want = _run(TorchNativeAttnBackend, batch, causal=True)
    got = _run(ExtendOnlyAttnBackend, batch, causal=True)
    assert not torch.isnan(got).any()
    # The same rows; the kernel blocks rows by the number of queries, so float32 rounding.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_extend_of_a_cached_prefix_matches_the_whole_prompt_computed_at_once():
    whole = _batch([(0, 700)])
    full = _run(ExtendOnlyAttnBackend, whole, causal=True)
    hit = dict(whole, query=whole["query"][640:], extend_prefix_lens=torch.tensor([640]),
               extend_seq_lens=torch.tensor([60]))
    torch.testing.assert_close(_run(ExtendOnlyAttnBackend, hit, causal=True), full[640:],
                               rtol=1e-5, atol=1e-6)


def test_a_new_token_never_sees_a_later_one():
    lens = [(32, 8)]
    batch = _batch(lens)
    base = _run(ExtendOnlyAttnBackend, batch, causal=True)
    later = batch["req_to_token"][0, 32 + 5 :]  # the KV of the last three new tokens changes
    batch["k_cache"][later] += 100.0
    batch["v_cache"][later] -= 100.0
    moved = _run(ExtendOnlyAttnBackend, batch, causal=True)
    assert torch.equal(moved[:5], base[:5])  # rows 0..4 do not attend to positions 37..39
    assert not torch.equal(moved[5:], base[5:])


def test_sliding_windows_take_torch_natives_own_path():
    batch = _batch([(40, 10)])
    want = _run(TorchNativeAttnBackend, batch, causal=True, sliding_window_size=16)
    assert torch.equal(_run(ExtendOnlyAttnBackend, batch, causal=True, sliding_window_size=16), want)


def test_the_plugin_makes_it_a_backend_choice():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from sglang_tokenlake.sglang.plugin import _register_cpu_attention

    _register_cpu_attention()
    _register_cpu_attention()  # idempotent
    assert ATTENTION_BACKEND_CHOICES.count(NAME) == 1

    class Runner:  # what the backend reads of SGLang's model runner
        device = "cpu"
        req_to_token_pool = object()
        token_to_kv_pool = object()

    backend = ATTENTION_BACKENDS[NAME](Runner())
    assert type(backend) is ExtendOnlyAttnBackend
    assert backend.token_to_kv_pool is Runner.token_to_kv_pool
