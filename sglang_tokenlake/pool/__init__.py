"""The live pool of one worker, as explicit objects (no SGLang import).

``PoolLink`` (link.py) composes them: membership and heartbeats, the shared
``PoolPolicy``, ``IndexSync`` (index.py: who holds which segment),
``Transfers`` (transfers.py: puts and pulls of KV) and ``RemoteAttention``
(remote.py: query shipping). What they need from the worker's cache and KV
memory is typed by the Protocols in surfaces.py; the SGLang adapter
(``sglang_tokenlake/sglang/cache.py``) provides them, unit tests use fakes.
"""

from sglang_tokenlake.pool.link import PoolLink

__all__ = ["PoolLink"]
