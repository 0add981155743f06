"""Kernel names for the pool's threads.

Python names its threads for itself only: ``top -H``, ``/proc/PID/task/TID/comm`` and the
benchmark's per-worker CPU accounting see every thread of a worker under the process's name,
so the CPU the pool's own threads take inside a worker's budget cannot be told from the
scheduler's. Each thread the pool starts names itself for the kernel when it starts:
``OS_PREFIX`` + its role, at most 15 bytes (the kernel's limit). Linux only; elsewhere, or if
the call fails, nothing happens.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import Optional

OS_PREFIX = "tl-"
MAX_NAME_BYTES = 15  # TASK_COMM_LEN - 1
_PR_SET_NAME = 15

_prctl: Optional[Callable[..., int]] = None
if sys.platform.startswith("linux"):
    try:  # the C library the interpreter runs on (no search for it: no subprocess at import)
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None


def os_name(role: str) -> str:
    """The kernel name a pool thread of this role gets."""
    return (OS_PREFIX + role).encode("ascii", "replace")[:MAX_NAME_BYTES].decode("ascii")


def name_this_thread(role: str) -> bool:
    """Give the calling thread its kernel name (``os_name(role)``); whether it took."""
    if _prctl is None:
        return False
    name = ctypes.c_char_p(os_name(role).encode("ascii"))
    try:
        return _prctl(_PR_SET_NAME, name, 0, 0, 0) == 0
    except OSError:
        return False
