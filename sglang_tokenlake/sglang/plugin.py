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

from sglang_tokenlake.sglang.guards import check_shipping, pooling_refusal

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
    _register_cpu_attention()
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
    # Every weight update ends in flush_cache: the default namespace follows the weights.
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.flush_cache", _after_flush_cache, HookType.AFTER
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


def _register_cpu_attention() -> None:
    """``--attention-backend torch_native_extend`` (sglang/cpu_attention.py)."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from sglang_tokenlake.sglang.cpu_attention import NAME

    def create(runner: Any) -> Any:
        from sglang_tokenlake.sglang.cpu_attention import ExtendOnlyAttnBackend

        return ExtendOnlyAttnBackend(runner)

    if NAME not in ATTENTION_BACKEND_CHOICES:
        ATTENTION_BACKEND_CHOICES.append(NAME)
    ATTENTION_BACKENDS[NAME] = create


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
    refusal = pooling_refusal(getattr(args, "tp_size", 1))
    if refusal:
        sys.exit(f"sglang-tokenlake: {refusal}")
    device = getattr(args, "device", None) or ("cuda" if _cuda_available() else "cpu")
    try:
        check_shipping(args, device, config.remote_mode)
    except ValueError as e:
        sys.exit(f"sglang-tokenlake: {e}")
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
    cache = TokenLakeCache(ctx.params, config, model_id=namespace_of(server_args))
    heads = int(getattr(ctx.model_config, "num_attention_heads", 0) or 0)
    cache.q_heads = max(1, heads // max(1, int(ctx.tp_size)))
    refusal = pooling_refusal(ctx.tp_size)
    if refusal:
        raise ValueError(refusal)
    # Shipping is wrong whenever a captured graph replays a pass the attention hooks
    # must see: refuse explicit ship mode, and let auto pull or recompute instead.
    ship = check_shipping(server_args, cache.device.type, config.remote_mode)
    if not ship.allowed and config.remote_mode == "auto":
        logger.warning("TokenLake: query shipping is off (remote segments are pulled or "
                       "recomputed): %s", ship.reason)
    if ctx.tp_rank == 0:
        start_service(cache, config, server_args)
        if cache.pool is not None:
            cache.pool.transfers.ship_ok = ship.allowed
    logger.info(
        "TokenLake cache ready: segment_size=%d page_size=%d namespace=%s",
        config.segment_size, ctx.params.page_size, cache.namespace,
    )
    return cache


def namespace_of(server_args: Any, model_path: Any = None,
                 weight_version: Any = None) -> str:
    """The default namespace (sglang_tokenlake/namespace.py): model path, --revision,
    a digest of the weight files and the weight version."""
    from sglang_tokenlake.namespace import default_namespace

    return default_namespace(
        str(model_path or server_args.model_path), getattr(server_args, "revision", None),
        weight_version or getattr(server_args, "weight_version", None),
    )


def _after_flush_cache(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """After a flush (every weight update ends in one) derive the default namespace
    again from the weights now served, so no KV of the old weights is ever matched."""
    cache = getattr(scheduler, "tree_cache", None)
    if result is False or not getattr(cache, "is_tokenlake", False) or cache.config.namespace:
        return
    runner = getattr(getattr(scheduler, "tp_worker", None), "model_runner", None)
    path = getattr(getattr(runner, "model_config", None), "model_path", None)
    try:
        from sglang.srt.runtime_context import get_serving

        version = get_serving().weight_version
    except Exception:
        version = None
    server_args = getattr(scheduler, "server_args", None)
    ns = namespace_of(server_args, path, version)
    if ns != cache.namespace:
        logger.info("TokenLake: namespace %s -> %s (weights changed)", cache.namespace, ns)
        cache.namespace = ns


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
