"""The default cache namespace: the served model *and its weights*.

Segment keys are seeded with the namespace, so workers share KV only within
one. The default is the model path plus ``@revision`` (``--revision``), a
digest of the weights and ``~weight_version`` (``--weight-version`` or the
version an update passed, when not ``default``), so KV computed with other
weights is never matched, also after ``/update_weights_from_disk``.

The digest is cheap and the same on every host holding the same files: per
weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf`` and
the shard indexes) its name, its size and 32 evenly spread 4 KiB blocks of its
content, plus ``config.json`` in full. File times are left out on purpose:
copies on different hosts differ there and would never pool. A hub id (not a
local directory) is looked up in the Hugging Face cache (its ``refs`` for the
revision, default ``main``) and digested from that snapshot.

Plain Python (no torch, no SGLang).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
IDENTITY_FILES = ("config.json",)
_BLOCKS, _BLOCK = 32, 4096


def _is_identity(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in IDENTITY_FILES


def _weight_files(directory: str) -> list[str]:
    """Weight and identity files of a model directory and its direct subdirectories."""
    out = []
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not entry.startswith("."):
            out += [os.path.join(entry, f) for f in sorted(os.listdir(path))
                    if _is_identity(f) and os.path.isfile(os.path.join(path, f))]
        elif _is_identity(entry) and os.path.isfile(path):
            out.append(entry)
    return out


def _file_digest(path: str, h: Any) -> None:
    size = os.path.getsize(path)
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if os.path.basename(path) in IDENTITY_FILES or size <= _BLOCKS * _BLOCK:
            h.update(f.read())
            return
        step = (size - _BLOCK) // (_BLOCKS - 1)
        for i in range(_BLOCKS):
            f.seek(i * step)
            h.update(f.read(_BLOCK))


def hub_snapshot(model_id: str, revision: Optional[str] = None) -> Optional[str]:
    """The local snapshot directory of a hub model id in the Hugging Face cache, if any."""
    if "/" not in model_id or os.path.isabs(model_id):
        return None
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"),
        "hub")
    repo = os.path.join(cache, "models--" + model_id.replace("/", "--"))
    ref = revision or "main"
    try:
        with open(os.path.join(repo, "refs", ref)) as f:
            ref = f.read().strip()
    except OSError:
        pass  # a commit hash given as the revision, or nothing cached
    snap = os.path.join(repo, "snapshots", ref)
    return snap if os.path.isdir(snap) else None


def weights_digest(model_path: str, revision: Optional[str] = None) -> Optional[str]:
    """16 hex digits identifying the weights at ``model_path`` (None: none found)."""
    directory = model_path if os.path.isdir(model_path) else hub_snapshot(model_path, revision)
    if directory is None:
        return None
    files = _weight_files(directory)
    if not files:
        return None
    h = hashlib.blake2b(digest_size=8)
    for rel in files:
        h.update(rel.encode() + b"\0")
        _file_digest(os.path.join(directory, rel), h)
    return h.hexdigest()


def default_namespace(model_path: str, revision: Optional[str] = None,
                      weight_version: Optional[str] = None) -> str:
    """``<model path>[@<revision>][#<weights digest>][~<weight version>]``."""
    ns = str(model_path)
    if revision:
        ns += f"@{revision}"
    digest = weights_digest(str(model_path), revision)
    if digest:
        ns += f"#{digest}"
    if weight_version and weight_version != "default":
        ns += f"~{weight_version}"
    return ns
