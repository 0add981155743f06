"""The worker's TokenLake broker inside the scheduler process.

It answers on ``tcp://<--tokenlake-host>:<--tokenlake-port>`` (default port:
``--port + 1000``). Work that reads the cache is queued to the scheduler thread
(``TokenLakeCache.submit``), so the broker thread never touches the tree or
the KV allocator.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Any, Optional

from sglang_tokenlake.config import BROKER_PORT_OFFSET, is_loopback
from sglang_tokenlake.transport.broker import Broker, Request

logger = logging.getLogger(__name__)



def broker_port(config: Any, server_args: Any) -> int:
    return config.port or int(server_args.port) + BROKER_PORT_OFFSET


def start_service(cache: Any, config: Any, server_args: Any) -> Broker:
    port = broker_port(config, server_args)
    host = config.advertise_host or config.host
    if host in ("0.0.0.0", "::", ""):
        raise ValueError(
            "--tokenlake-host binds to all interfaces: set --tokenlake-advertise-host to "
            "the address other workers should use"
        )
    worker_id = f"{host}:{port}"

    def ping(req: Request) -> None:
        req.reply("pong", {"worker": worker_id, "pid": os.getpid()})

    def status(req: Request) -> None:
        want_keys = bool(req.msg.header.get("keys"))

        def job() -> None:
            try:
                st = cache.status()
            except AssertionError as e:  # an integrity violation is news, not a crash
                req.error(f"integrity check failed: {e}")
                return
            st["worker"] = worker_id
            st["broker"] = dict(broker.counters)
            if want_keys and cache.pool is not None:
                st["designated_keys"] = cache.pool.designated_keys()
                st["transient_keys"] = cache.pool.designated_keys(False)
            req.reply("status", st)

        cache.submit(job)

    from sglang_tokenlake.pool import PoolLink
    from sglang_tokenlake.sglang.hooks import ENGINE_ATTR
    from sglang_tokenlake.transport.auth import load_curve_keys, start_authenticator

    # Each worker its own key: the one whose certificate names this broker's address.
    keys = load_curve_keys(config.curve_dir, config.curve_key, member=worker_id)
    curve_keys = {}
    if keys is None and not is_loopback(config.host):  # allowed by --tokenlake-insecure only
        logger.warning(
            "TokenLake: broker on %s serves the pool WITHOUT authentication "
            "(--tokenlake-insecure): anyone who reaches it can join, read and write cached KV",
            config.host)
    if keys is not None:
        import zmq

        start_authenticator(zmq.Context.instance(), config.curve_dir)
        curve_keys = {"curve_public_key": keys.public, "curve_secret_key": keys.secret}
    try:
        pool: Optional[PoolLink] = PoolLink(cache, config, worker_id, curve=keys)
    except ValueError as e:  # a KV pool TokenLake cannot move (e.g. MLA)
        if config.peer_list():
            raise
        logger.warning("TokenLake: pooling disabled on this worker: %s", e)
        pool = None
    if pool is not None:  # the attention hooks find the engine through the KV pool
        setattr(cache.kv_store(), ENGINE_ATTR, pool.remote)
    broker = Broker(
        f"tcp://{config.host}:{port}",
        {"ping": ping, "status": status, **(pool.handlers() if pool is not None else {})},
        name=f"tokenlake-broker-{port}",
        **({"max_frame_bytes": pool.transfers.max_frame_bytes} if pool is not None else {}),
        **curve_keys,
    )
    try:
        broker.start()
    except Exception as e:
        raise RuntimeError(
            f"TokenLake broker cannot bind tcp://{config.host}:{port}: {e}. "
            "Choose a free port with --tokenlake-port."
        ) from e
    atexit.register(broker.close)
    if pool is not None and keys is None and config.kv_stream:
        from sglang_tokenlake.transport.stream import StreamServer

        stream = StreamServer(config.host, pool.stream_handlers(), name=f"tokenlake-stream-{port}")
        try:
            pool.kv_port = stream.start()
        except OSError as e:  # pulls from this worker take the broker instead
            logger.warning("TokenLake: no KV stream on %s (%s); peers pull over the broker",
                           config.host, e)
        else:
            atexit.register(stream.close)
            logger.info("TokenLake KV stream on %s:%d", config.host, pool.kv_port)
    if pool is not None:
        atexit.register(pool.close)
    cache.broker = broker
    cache.pool = pool
    logger.info("TokenLake broker listening on %s", broker.bound_endpoint)
    return broker
