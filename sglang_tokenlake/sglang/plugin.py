"""SGLang plugin (entry point group ``sglang.srt.plugins``).

SGLang calls ``register()`` in the launcher, before it parses arguments, and
again in every scheduler process. It:

* registers the radix-cache backend ``tokenlake``;
* adds ``--cache-backend {radix,tokenlake}`` and the ``--tokenlake-*`` options
  (generated from ``TokenLakeConfig``) to ``python -m sglang.launch_server``;
* turns ``--cache-backend tokenlake`` into ``--radix-cache-backend tokenlake``,
  refusing incompatible flags with a clear message at start-up, and carries the
  TokenLake settings to the scheduler processes on the ServerArgs record;
* lets the cache do its scheduler-thread work once per scheduler iteration.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

BACKEND = "tokenlake"
_CONFIG_ATTR = "_tokenlake_config"  # bookkeeping attribute: survives pickling to children
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.mem_cache.registry import register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    try:
        register_radix_cache_backend(BACKEND, _tree_cache_factory)
    except ValueError:  # registered already by an earlier load in this process
        pass
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.from_cli_args", _around_from_cli_args, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.ingest_requests",
        _after_ingest_requests,
        HookType.AFTER,
    )
    # Query-centric attention (pool/remote.py, sglang/hooks.py): the attention backends' outputs
    # for requests whose prefix stays on other workers, and the retraction of a
    # request whose owner failed during a forward pass.
    from sglang_tokenlake.sglang.hooks import (
        around_process_batch_result,
        around_run_batch,
        attention_hook,
    )

    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.run_batch", around_run_batch, HookType.AROUND
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.process_batch_result",
        around_process_batch_result,
        HookType.AROUND,
    )
    backends = ["sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"]
    if _cuda_available():
        backends.append("sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend")
    for cls in backends:
        apply_cap = not cls.endswith("TorchNativeAttnBackend")  # torch_native ignores logit_cap
        HookRegistry.register(f"{cls}.forward_extend", attention_hook(False, apply_cap),
                              HookType.AROUND)
        HookRegistry.register(f"{cls}.forward_decode", attention_hook(True, apply_cap),
                              HookType.AROUND)


# -- CLI ------------------------------------------------------------------------


def _after_add_cli_args(result: Any, parser: argparse.ArgumentParser) -> None:
    from sglang_tokenlake.config import TokenLakeConfig

    parser.add_argument(
        "--cache-backend",
        choices=["radix", BACKEND],
        default="radix",
        help="Prefix cache: 'radix' is SGLang's own radix cache; 'tokenlake' pools full "
        "segments of every prefix across the workers of one TokenLake pool (a single "
        "worker is a pool of one). See the --tokenlake-* options.",
    )
    TokenLakeConfig.add_cli_args(parser)


def incompatible_flags(args: argparse.Namespace) -> list[str]:
    """The flags set on ``args`` that --cache-backend tokenlake cannot serve with."""
    bad = []

    def on(name: str) -> bool:
        return bool(getattr(args, name, None))

    for name, flag in [
        ("disable_radix_cache", "--disable-radix-cache"),
        ("enable_hierarchical_cache", "--enable-hierarchical-cache"),
        ("enable_session_radix_cache", "--enable-session-radix-cache"),
        ("enable_streaming_session", "--enable-streaming-session"),
        ("enable_kv_cache_sharding", "--enable-kv-cache-sharding"),
        ("enable_lmcache", "--enable-lmcache"),
        ("enable_flexkv", "--enable-flexkv"),
        ("enable_unified_cache_external_linker", "--enable-unified-cache-external-linker"),
    ]:
        if on(name):
            bad.append(flag)
    if getattr(args, "speculative_algorithm", None):
        bad.append("--speculative-algorithm")
    policy = getattr(args, "radix_eviction_policy", "lru")
    if policy and policy != "lru" and getattr(args, "_radix_eviction_policy_explicitly_set", True):
        bad.append(f"--radix-eviction-policy {policy} (tokenlake evicts segments LRU, leaf first)")
    return bad


def _around_from_cli_args(original: Any, cls: Any, args: argparse.Namespace) -> Any:
    from sglang_tokenlake.config import TokenLakeConfig

    backend = getattr(args, "cache_backend", "radix")
    if backend != BACKEND:
        return original(cls, args)
    try:
        config = TokenLakeConfig.from_cli_args(args)
    except ValueError as e:
        sys.exit(f"sglang-tokenlake: {e}")
    radix_backend = getattr(args, "radix_cache_backend", None)
    if radix_backend not in (None, BACKEND):
        sys.exit(
            f"sglang-tokenlake: --cache-backend tokenlake conflicts with "
            f"--radix-cache-backend {radix_backend}; pass only one of them."
        )
    bad = incompatible_flags(args)
    if bad:
        sys.exit(
            "sglang-tokenlake: --cache-backend tokenlake cannot be combined with: "
            + ", ".join(bad)
        )
    page_size = getattr(args, "page_size", None)
    if page_size is not None and config.segment_size % page_size:
        sys.exit(
            f"sglang-tokenlake: --tokenlake-segment-size ({config.segment_size}) must be a "
            f"multiple of --page-size ({page_size})."
        )
    args.radix_cache_backend = BACKEND
    server_args = original(cls, args)
    setattr(server_args, _CONFIG_ATTR, config.to_dict())
    return server_args


def config_of(server_args: Any) -> Any:
    """The TokenLake settings carried on a ServerArgs record (defaults when absent,
    e.g. when a caller selected ``--radix-cache-backend tokenlake`` directly)."""
    from sglang_tokenlake.config import TokenLakeConfig

    d = getattr(server_args, _CONFIG_ATTR, None)
    return TokenLakeConfig.from_dict(d) if d else TokenLakeConfig()


# -- the cache -------------------------------------------------------------------


def _tree_cache_factory(ctx: Any) -> Any:
    """Build the TokenLake cache for one scheduler (radix-cache registry factory)."""
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or ctx.is_dsa:
        raise ValueError(
            "--cache-backend tokenlake serves full-attention models only "
            "(this model has sliding-window, state-space or sparse attention layers)"
        )
    if ctx.enable_hierarchical_cache:
        raise ValueError("--cache-backend tokenlake cannot be combined with --enable-hierarchical-cache")
    from sglang_tokenlake.sglang.cache import TokenLakeCache
    from sglang_tokenlake.sglang.service import start_service

    server_args = ctx.server_args
    config = config_of(server_args)
    cache = TokenLakeCache(ctx.params, config, model_id=str(server_args.model_path))
    heads = int(getattr(ctx.model_config, "num_attention_heads", 0) or 0)
    cache.q_heads = max(1, heads // max(1, int(ctx.tp_size)))
    ship_ok = ship_supported(server_args)
    if config.remote_mode == "ship" and not ship_ok:
        raise ValueError(
            "--tokenlake-remote-mode ship needs every forward pass to run through the "
            "attention hooks: add --disable-overlap-schedule and "
            "--cuda-graph-backend-decode disabled (or use --tokenlake-remote-mode pull/auto)"
        )
    if ctx.tp_size > 1 and config.peer_list():
        raise ValueError("pooling across workers supports --tp-size 1 only")
    if ctx.tp_rank == 0:
        start_service(cache, config, server_args)
        if cache.pool is not None:
            cache.pool.ship_ok = ship_ok
    logger.info(
        "TokenLake cache ready: segment_size=%d page_size=%d namespace=%s",
        config.segment_size, ctx.params.page_size, cache.namespace,
    )
    return cache


def ship_supported(server_args: Any) -> bool:
    """Query shipping replaces attention outputs in Python hooks: it needs forward
    passes that are neither overlapped with scheduling nor replayed from CUDA graphs."""
    overlap_off = bool(getattr(server_args, "disable_overlap_schedule", False))
    graphs = getattr(server_args, "cuda_graph_backend_decode", None)
    graphs_off = graphs in (None, "disabled") or bool(getattr(server_args, "disable_cuda_graph", False))
    return overlap_off and graphs_off


def _after_ingest_requests(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    cache = getattr(scheduler, "tree_cache", None)
    if getattr(cache, "is_tokenlake", False):
        if cache._scheduler is None:
            cache.attach_scheduler(scheduler)
        cache.poll()


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False
