"""CURVE keys of a pool: authentication and encryption of every broker socket.

``tokenlake keygen DIR`` writes one keypair for the pool (``DIR/pool.key`` and
``DIR/pool.key_secret``, ZeroMQ certificate files). Every worker started with
``--tokenlake-curve-dir DIR`` serves CURVE on its broker and connects to its
peers with the same keys; a ZAP authenticator admits only clients whose public
key is in DIR. A peer without the secret key cannot complete the handshake: it
gets nothing back. Keep DIR readable only by the service account.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Optional

import zmq
import zmq.auth

POOL_NAME = "pool"


def keygen(directory: str) -> tuple[Path, Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pub, sec = zmq.auth.create_certificates(str(d), POOL_NAME)
    os.chmod(sec, 0o600)
    return Path(pub), Path(sec)


class CurveKeys(NamedTuple):
    """What a CURVE socket of the pool is given. The pool has one keypair, so a
    client's ``server_public`` is its own ``public``; a broker uses ``public`` and
    ``secret``."""

    server_public: bytes
    public: bytes
    secret: bytes


def load_curve_keys(directory: Optional[str]) -> Optional[CurveKeys]:
    """The keys in ``directory`` (made by ``keygen``); None when no directory is given.

    The one place keys are read: brokers, peer agents and ``tokenlake status`` all
    start from it.
    """
    if not directory:
        return None
    pub, sec = _load_pool_keys(directory)
    return CurveKeys(pub, pub, sec)


def _load_pool_keys(directory: str) -> tuple[bytes, bytes]:
    """(public, secret) of the pool; clear errors when the files are missing.

    Prefer ``load_curve_keys``; this reads the files for it.
    """
    sec = Path(directory) / f"{POOL_NAME}.key_secret"
    if not sec.exists():
        raise FileNotFoundError(
            f"{sec} not found: create the pool keys with `tokenlake keygen {directory}`"
        )
    pub, secret = zmq.auth.load_certificate(str(sec))
    if secret is None:
        raise ValueError(f"{sec} holds no secret key")
    return pub, secret


_authenticators: dict[int, Any] = {}


def start_authenticator(ctx: zmq.Context, directory: str) -> Any:
    """Admit CURVE clients whose public keys are in ``directory`` (once per context)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = _authenticators.get(id(ctx))
    if auth is None:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        _authenticators[id(ctx)] = auth
    auth.configure_curve(domain="*", location=str(directory))
    return auth
