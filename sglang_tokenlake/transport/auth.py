"""CURVE keys of a pool: per-worker identities, an allow-list, encrypted sockets.

Key directory (``--tokenlake-curve-dir DIR``)::

    DIR/w0.key          public certificate of worker w0: its key and ``member = "10.0.0.5:31000"``
    DIR/w1.key          ... one per worker: the pool's allow-list
    DIR/ops.key         a key without ``member``: may read ``status`` (and ``ping``) only
    DIR/w0.key_secret   the secret key of w0: on w0's host only (``--tokenlake-curve-key w0``)

``tokenlake keygen DIR --name w0 --member HOST:PORT`` writes one such pair. A
broker serves CURVE with its worker's own key and admits (ZAP) only clients
whose public key has a certificate in DIR; every admitted connection carries
its key to the handlers (``Request.user``), and the pool binds a message's
``from`` to the member named in that key's certificate (pool/identity.py). A
worker connects to a peer only when DIR holds the peer's certificate (its
public key is the server key the handshake checks). Keep secret files readable
only by the service account; certificates are read once, at start-up.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import zmq
import zmq.auth

MEMBER_FIELD = "member"


def _write_cert(path: Path, public: bytes, secret: Optional[bytes], member: Optional[str]) -> None:
    kind = "Secret" if secret else "Public"
    lines = [f"#   ****  Generated on {datetime.datetime.now()} by tokenlake keygen  ****",
             f"#   ZeroMQ CURVE {kind} Certificate", "", "metadata"]
    if member:
        lines.append(f'    {MEMBER_FIELD} = "{member}"')
    lines += ["curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def keygen(directory: str, name: str, member: Optional[str] = None) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public, names ``member``) and ``DIR/NAME.key_secret`` (0600).

    ``member`` is the broker address ``HOST:PORT`` the key speaks for; without it
    the key can only read ``status``. Existing files are never overwritten.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r}: use a plain file name such as w0")
    if member is not None:
        host, sep, port = member.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"member {member!r} is not HOST:PORT (the worker's broker address)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pub, sec = d / f"{name}.key", d / f"{name}.key_secret"
    for p in (pub, sec):
        if p.exists():
            raise FileExistsError(f"{p} exists: keys are never overwritten")
    public, secret = zmq.curve_keypair()
    _write_cert(sec, public, secret, member)
    _write_cert(pub, public, None, member)
    return pub, sec


def _member_of_cert(path: Path) -> Optional[str]:
    """The ``member`` of a certificate's metadata section, if any."""
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw[0].isspace():
            section = line
            continue
        key, sep, value = line.partition("=")
        if section == "metadata" and sep and key.strip() == MEMBER_FIELD:
            return value.strip().strip("\"'") or None
    return None


@dataclass(frozen=True)
class CurveKeys:
    """One process's CURVE identity and the pool's allow-list (from ``load_curve_keys``).

    ``public``/``secret``: this process's key pair (a broker's server key too).
    ``members``: member id (``HOST:PORT``) -> public key, from the certificates.
    ``allowed``: every admitted public key (z85 text, as ZAP reports it) -> the
    member it speaks for, or None for a status-only key.
    """

    directory: str
    public: bytes
    secret: bytes
    member: Optional[str] = None
    members: dict[str, bytes] = field(default_factory=dict)
    allowed: dict[str, Optional[str]] = field(default_factory=dict)

    def server_key(self, member: str) -> Optional[bytes]:
        """The public key the broker at ``member`` (``HOST:PORT``) must prove it holds."""
        return self.members.get(_address(member))

    def member_of(self, user: Optional[str]) -> Optional[str]:
        """The member an authenticated connection's key (``Request.user``) speaks for."""
        return self.allowed.get(user) if user else None


def _address(endpoint: str) -> str:
    return endpoint.split("://", 1)[-1]


def read_allow_list(directory: str) -> tuple[dict[str, bytes], dict[str, Optional[str]]]:
    """(member -> public key, public key -> member or None) of the certificates in DIR."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(
            f"{d} is not a directory: create keys with `tokenlake keygen {directory} --name W "
            "--member HOST:PORT`")
    members: dict[str, bytes] = {}
    allowed: dict[str, Optional[str]] = {}
    for cert in sorted(d.glob("*.key")):
        public, _ = zmq.auth.load_certificate(str(cert))
        member = _member_of_cert(cert)
        if member is not None:
            if member in members and members[member] != public:
                raise ValueError(f"{cert}: member {member} has two keys in {directory}")
            members[member] = public
        allowed[public.decode()] = member
    return members, allowed


def load_curve_keys(directory: Optional[str], key: Optional[str] = None,
                    member: Optional[str] = None) -> Optional[CurveKeys]:
    """The keys in ``directory``; None when no directory is given.

    ``key``: the secret key to use, a name in DIR (``w0`` -> ``DIR/w0.key_secret``)
    or a path. Default: a worker (``member`` given) uses the key whose certificate
    names it; a client (``tokenlake status``) the first status-only secret key in
    DIR, else the first secret key there. A worker's key must name the worker.
    """
    if not directory:
        return None
    members, allowed = read_allow_list(directory)
    sec = _secret_path(directory, key, member, members)
    pub, secret = zmq.auth.load_certificate(str(sec))
    if secret is None:
        raise ValueError(f"{sec} holds no secret key")
    if pub.decode() not in allowed:
        raise ValueError(f"{sec}: its public certificate is not in {directory}, so brokers "
                         "refuse it; copy its .key file there")
    own = allowed[pub.decode()]
    if member is not None and own != member:
        raise ValueError(f"{sec} speaks for member {own!r}, not {member!r}: each worker needs "
                         f"its own key (`tokenlake keygen {directory} --name W --member {member}`)")
    return CurveKeys(str(directory), pub, secret, own, members, allowed)


def _secret_path(directory: str, key: Optional[str], member: Optional[str],
                 members: dict[str, bytes]) -> Path:
    d = Path(directory)
    if key:
        p = Path(key) if ("/" in key or key.endswith(".key_secret")) else d / f"{key}.key_secret"
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (--tokenlake-curve-key {key})")
        return p
    secrets = sorted(d.glob("*.key_secret"))
    if member is not None:
        for p in secrets:
            if _member_of_cert(p) == member:
                return p
        raise FileNotFoundError(
            f"no secret key for member {member} in {directory}: create one with `tokenlake "
            f"keygen {directory} --name W --member {member}` or pass --tokenlake-curve-key")
    for p in secrets:
        if _member_of_cert(p) is None:
            return p
    if secrets:
        return secrets[0]
    raise FileNotFoundError(
        f"no secret key in {directory}: create one with `tokenlake keygen {directory} --name ops`")


_authenticators: dict[int, Any] = {}


def start_authenticator(ctx: zmq.Context, directory: str) -> Any:
    """Admit CURVE clients whose public keys are in ``directory`` (once per context).

    ZAP reports each admitted key (z85) as the connection's User-Id.
    """
    from zmq.auth.thread import ThreadAuthenticator

    auth = _authenticators.get(id(ctx))
    if auth is None:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        _authenticators[id(ctx)] = auth
    auth.configure_curve(domain="*", location=str(directory))
    return auth
