"""Start-up decisions that keep query shipping and pooling correct.

Query shipping (``--tokenlake-remote-mode ship``, and ``auto`` when it picks
shipping) replaces attention outputs in Python hooks around the attention
backends' ``forward_extend`` / ``forward_decode``. A forward pass replayed from a
captured graph never calls those hooks, so a shipped request would attend to
the padding slot 0 instead of its owners' segments: silently wrong output.
Shipping is therefore allowed only when no captured graph can replay any
forward pass (prefill/extend or decode) and passes are not overlapped with
scheduling.

SGLang 0.5.23 captures, on CUDA, a ``full`` decode graph and a ``breakable``
prefill graph by default (``cuda_graph_config``: decode ``full``, prefill
``default_prefill_backend()`` = ``breakable`` on CUDA); on CPU it replays
graphs only under ``--enable-torch-compile`` (CPUGraphRunner). The decision
reads both the raw flags (with SGLang's CUDA defaults and its precedence:
``--disable-cuda-graph`` < ``--disable-{prefill,decode}-cuda-graph`` <
``--cuda-graph-backend-{decode,prefill}`` < ``--cuda-graph-config`` JSON) and,
once SGLang resolved the record, the resolved ``cuda_graph_config``: a phase
counts as graphed if either says so.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

PHASES = ("decode", "prefill")
_CUDA_DEFAULTS = {"decode": "full", "prefill": "breakable"}
_DISABLED = "disabled"
FLAGS_NO_GRAPHS = "--cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled"


class ShipDecision(NamedTuple):
    allowed: bool
    reason: str
    """Why shipping is not allowed (empty when it is)."""


def _get(args: Any, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _flag_backends(args: Any) -> dict[str, str]:
    """Per-phase graph backends the raw flags select on CUDA (SGLang's precedence)."""
    out = dict(_CUDA_DEFAULTS)
    if _get(args, "disable_cuda_graph"):
        out = {p: _DISABLED for p in PHASES}
    if _get(args, "disable_prefill_cuda_graph"):
        out["prefill"] = _DISABLED
    if _get(args, "disable_decode_cuda_graph"):
        out["decode"] = _DISABLED
    for p in PHASES:
        b = _get(args, f"cuda_graph_backend_{p}")
        if b is not None:
            out[p] = str(b)
    explicit = _get(args, "cuda_graph_config")
    if isinstance(explicit, dict):
        for p in PHASES:
            b = (explicit.get(p) or {}).get("backend")
            if b is not None:
                out[p] = str(b)
    elif explicit is not None:  # a CudaGraphConfig record
        for p in PHASES:
            b = getattr(getattr(explicit, p, None), "backend", None)
            if b is not None:
                out[p] = str(b)
    return out


def _resolved_backends(args: Any) -> dict[str, str]:
    """Per-phase backends SGLang's resolution decided, if it ran on ``args``."""
    if not getattr(args, "_resolved_overrides", None):
        return {}
    try:
        from sglang.srt.arg_groups.model_override_base import resolved_view

        cfg = resolved_view(args).cuda_graph_config
    except Exception:
        return {}
    out = {}
    for p in PHASES:
        b = getattr(getattr(cfg, p, None), "backend", None)
        if b is not None:
            out[p] = str(b)
    return out


def graphed_phases(server_args: Any, device: str) -> list[str]:
    """The forward phases whose passes a captured graph may replay on ``device``."""
    if not str(device).startswith("cuda"):
        # CPUGraphRunner captures only under torch.compile; other devices: none we hook.
        return list(PHASES) if _get(server_args, "enable_torch_compile") else []
    flags = _flag_backends(server_args)
    resolved = _resolved_backends(server_args)
    return [p for p in PHASES
            if flags[p] != _DISABLED or resolved.get(p, _DISABLED) != _DISABLED]


def shipping_decision(server_args: Any, device: str) -> ShipDecision:
    """Whether query shipping is correct with these SGLang settings on ``device``."""
    phases = graphed_phases(server_args, device)
    if phases:
        if str(device).startswith("cuda"):
            what = f"CUDA graphs cover the {' and '.join(phases)} passes"
            fix = f"pass {FLAGS_NO_GRAPHS}"
        else:
            what = "--enable-torch-compile replays captured graphs"
            fix = "drop --enable-torch-compile"
        return ShipDecision(False, f"{what}, which bypass the attention hooks that ship "
                                   f"queries; {fix}")
    if not _get(server_args, "disable_overlap_schedule"):
        return ShipDecision(False, "the overlap scheduler runs forward passes ahead of the "
                                   "attention hooks' bookkeeping; pass --disable-overlap-schedule")
    return ShipDecision(True, "")


def check_shipping(server_args: Any, device: str, remote_mode: str) -> ShipDecision:
    """Refuse ``ship`` mode that cannot be served correctly (ValueError naming the
    flags to pass); for other modes just return the decision (``auto`` then pulls
    or recomputes instead of shipping)."""
    d = shipping_decision(server_args, device)
    if remote_mode == "ship" and not d.allowed:
        raise ValueError(f"--tokenlake-remote-mode ship cannot be served: {d.reason} "
                         "(or use --tokenlake-remote-mode pull or auto)")
    return d


def pooling_refusal(tp_size: Optional[int]) -> Optional[str]:
    """Why this worker cannot run a TokenLake broker, or None.

    Every TokenLake worker runs a broker that accepts pool joins and serves and
    stores KV in its rank's layout; with tensor parallelism each rank holds only
    its share of the heads, so pooling (even a pool of one that peers may join)
    is refused."""
    if tp_size is not None and int(tp_size) > 1:
        return (f"--cache-backend tokenlake supports --tp-size 1 only (got --tp-size {tp_size}): "
                "every TokenLake worker runs a pool broker that serves and stores KV, and a "
                "tensor-parallel rank holds only part of it; run one worker per GPU and pool "
                "them with --tokenlake-peers instead")
    return None
