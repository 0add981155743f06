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
from typing import Any

from sglang_tokenlake.transport.broker import Broker, Request

logger = logging.getLogger(__name__)

PORT_OFFSET = 1000


def broker_port(config: Any, server_args: Any) -> int:
    return config.port or int(server_args.port) + PORT_OFFSET


def start_service(cache: Any, config: Any, server_args: Any) -> Broker:
    port = broker_port(config, server_args)
    worker_id = f"{config.host}:{port}"

    def ping(req: Request) -> None:
        req.reply("pong", {"worker": worker_id, "pid": os.getpid()})

    def status(req: Request) -> None:
        def job() -> None:
            try:
                st = cache.status()
            except AssertionError as e:  # an integrity violation is news, not a crash
                req.error(f"integrity check failed: {e}")
                return
            st["worker"] = worker_id
            st["broker"] = dict(broker.counters)
            req.reply("status", st)

        cache.submit(job)

    broker = Broker(
        f"tcp://{config.host}:{port}",
        {"ping": ping, "status": status},
        name=f"tokenlake-broker-{port}",
    )
    try:
        broker.start()
    except Exception as e:
        raise RuntimeError(
            f"TokenLake broker cannot bind tcp://{config.host}:{port}: {e}. "
            "Choose a free port with --tokenlake-port."
        ) from e
    atexit.register(broker.close)
    cache.broker = broker
    logger.info("TokenLake broker listening on %s", broker.bound_endpoint)
    return broker
