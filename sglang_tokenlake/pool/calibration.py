"""What this worker measures about itself and its links, for dispatch's time model.

Each figure is an exponentially weighted average of cheap measurements taken
on the way::

    prefill s/token   this worker's own extend passes: the slope of seconds over
                      tokens (a token's marginal cost)       (scheduler thread)
    RTT per peer      heartbeat round trips                  (peer agent thread)
    ship RTT / peer   shipped queries to their partials      (peer agent thread)
    bandwidth / peer  sizes and durations of pulls            (peer agent thread)
    attention cost    partial attention served as an owner   (broker thread)

Until a figure has a measurement, the prior (``dispatch.Costs`` defaults) is
used; a figure pinned by a flag is never replaced (tests, or operators who know
better). ``costs()`` hands dispatch a ``Costs`` built from the current values.
Every update is one float assignment, so readers on other threads never see a
torn value.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

from sglang_tokenlake.dispatch import Costs, Link

ALPHA = 0.2  # weight of a new measurement
SHIP_ALPHA = 0.05  # shipped layers wait heavy-tailed times (an owner's busy CPU): a longer memory
PREFILL_ALPHA = 0.05  # a fit of passes needs more of them than an average
MIN_TRANSFER_BYTES = 64 << 10  # smaller pulls measure round trips, not bandwidth


class Average:
    """Exponentially weighted average. The first ``1 / alpha`` samples are averaged
    plainly (each new one weighs ``1 / samples``): one early sample does not stand
    for the rest, and a rare slow one counts at its share."""

    __slots__ = ("value", "samples", "alpha")

    def __init__(self, alpha: float = ALPHA) -> None:
        self.value: Optional[float] = None
        self.samples = 0
        self.alpha = alpha

    def add(self, x: float) -> None:
        if not math.isfinite(x) or x < 0:
            return
        self.samples += 1
        w = max(self.alpha, 1.0 / self.samples)
        self.value = x if self.value is None else (1 - w) * self.value + w * x

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


class PassFit:
    """Seconds of an extend pass as ``fixed + per_token x tokens``, fitted by exponentially
    weighted least squares over recent passes; ``per_token()`` is the slope, a prefilled
    token's marginal cost. Seconds over tokens per pass would charge each token its pass's
    fixed cost: a short extend after a long cached prefix pays for attending to the prefix
    (in backends that recompute it per pass), which more tokens would not multiply. While
    the passes seen do not vary enough in size to give a slope (or give a nonsensical one),
    total seconds over total tokens is used."""

    __slots__ = ("alpha", "samples", "w", "n", "t", "nn", "nt")

    def __init__(self, alpha: float = PREFILL_ALPHA) -> None:
        self.alpha = alpha
        self.samples = 0
        self.w = self.n = self.t = self.nn = self.nt = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        self.samples += 1
        keep = 1 - max(self.alpha, 1.0 / self.samples)
        n = float(tokens)
        self.w = keep * self.w + 1
        self.n = keep * self.n + n
        self.t = keep * self.t + seconds
        self.nn = keep * self.nn + n * n
        self.nt = keep * self.nt + n * seconds

    def per_token(self) -> Optional[float]:
        if not self.samples:
            return None
        ratio = self.t / self.n
        mean_n = self.n / self.w
        var = self.nn / self.w - mean_n * mean_n
        if self.samples < 3 or var <= (0.25 * mean_n) ** 2:
            return ratio  # sizes too alike to separate fixed from per-token cost
        slope = (self.nt / self.w - mean_n * self.t / self.w) / var
        return slope if 0 < slope <= ratio else ratio


class Calibration:
    """Measured costs of one worker.

    Args:
        prior: the costs used where nothing is measured yet.
        prefill_s_per_token, rtt_s, bandwidth_Bps: pinned figures (None: measured).
    """

    def __init__(self, prior: Optional[Costs] = None, *,
                 prefill_s_per_token: Optional[float] = None, rtt_s: Optional[float] = None,
                 bandwidth_Bps: Optional[float] = None) -> None:
        self.prior = prior if prior is not None else Costs()
        self.pinned = {"prefill_s_per_token": prefill_s_per_token, "rtt_s": rtt_s,
                       "bandwidth_Bps": bandwidth_Bps}
        self.prefill = PassFit()
        self.passes = Average()
        self.layers = 1
        """Layers of the served model (set by the pool): a pass's time per layer."""
        self.attention = Average()
        self.rtt: dict[str, Average] = {}
        self.ship_rtt: dict[str, Average] = {}
        self.bandwidth: dict[str, Average] = {}

    # -- measurements ------------------------------------------------------------------

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """An extend pass prefilled ``tokens`` tokens in ``seconds``."""
        self.prefill.add(tokens, seconds)

    def observe_pass(self, seconds: float) -> None:
        """One forward pass (prefill or decode) of this worker took ``seconds``."""
        self.passes.add(seconds)

    def observe_rtt(self, peer: str, seconds: float) -> None:
        self.rtt.setdefault(peer, Average()).add(seconds)

    def observe_ship(self, peer: str, seconds: float) -> None:
        """One layer's queries shipped to ``peer`` came back as partials after ``seconds``:
        unlike a heartbeat, this includes the owner's queueing and compute."""
        self.ship_rtt.setdefault(peer, Average(SHIP_ALPHA)).add(seconds)

    def observe_transfer(self, peer: str, nbytes: int, seconds: float) -> None:
        """A pull of ``nbytes`` from ``peer`` took ``seconds`` (request to reply)."""
        if nbytes < MIN_TRANSFER_BYTES:
            return
        # Less the round trip, as heartbeats measure it; they are noisy (a peer's busy CPU
        # answers some late), so at most half of the pull's time is taken for it.
        rtt = min(self.rtt_of(peer), seconds / 2)
        self.bandwidth.setdefault(peer, Average()).add(nbytes / max(seconds - rtt, 1e-6))

    def observe_attention(self, query_tokens: int, cached_tokens: int, seconds: float) -> None:
        pairs = query_tokens * cached_tokens
        if pairs > 0:
            self.attention.add(seconds / pairs)

    def forget(self, peer: str) -> None:
        self.rtt.pop(peer, None)
        self.ship_rtt.pop(peer, None)
        self.bandwidth.pop(peer, None)

    # -- current figures ----------------------------------------------------------------

    def prefill_s_per_token(self) -> float:
        pin = self.pinned["prefill_s_per_token"]
        if pin is not None:
            return pin
        got = self.prefill.per_token()
        return got if got is not None else self.prior.recompute_s_per_token

    def rtt_of(self, peer: str) -> float:
        pin = self.pinned["rtt_s"]
        if pin is not None:
            return pin
        avg = self.rtt.get(peer)
        return avg.get(self.prior.rtt_s) if avg is not None else self.prior.rtt_s

    def peers(self) -> set[str]:
        """Peers with any measurement."""
        return set(self.rtt) | set(self.bandwidth) | set(self.ship_rtt)

    def ship_rtt_of(self, peer: str) -> float:
        """Shipping round trip per layer to ``peer``: measured; until then one layer of this
        worker's mean forward pass (an owner as busy as this worker answers a layer's queries
        once its own layer is done: a heartbeat's echo, answered at once, says nothing of
        that); 0 while nothing is measured or when RTT is pinned."""
        if self.pinned["rtt_s"] is not None:
            return 0.0
        avg = self.ship_rtt.get(peer)
        if avg is not None and avg.samples:
            return avg.get(0.0)
        return self.passes.get(0.0) / max(self.layers, 1)

    def bandwidth_of(self, peer: str) -> float:
        pin = self.pinned["bandwidth_Bps"]
        if pin is not None:
            return pin
        avg = self.bandwidth.get(peer)
        return avg.get(self.prior.bandwidth_Bps) if avg is not None else self.prior.bandwidth_Bps

    def costs(self, memory_pressure: float = 0.0, batch: int = 1) -> Costs:
        links = {p: Link(self.rtt_of(p), self.bandwidth_of(p), self.ship_rtt_of(p))
                 for p in self.peers()}  # peers: those with any measurement (heartbeats)
        return replace(
            self.prior,
            recompute_s_per_token=self.prefill_s_per_token(),
            attn_s_per_token_pair=self.attention.get(self.prior.attn_s_per_token_pair),
            rtt_s=self.pinned["rtt_s"] if self.pinned["rtt_s"] is not None else self.prior.rtt_s,
            bandwidth_Bps=(self.pinned["bandwidth_Bps"] if self.pinned["bandwidth_Bps"] is not None
                           else self.prior.bandwidth_Bps),
            links=links,
            memory_pressure=min(1.0, max(0.0, memory_pressure)),
            batch=max(1, batch),
        )

    def snapshot(self) -> dict[str, Any]:
        """For ``tokenlake status`` and /metrics: the figures, and where they come from."""

        def source(name: str, avg: Optional[Average | PassFit]) -> str:
            if self.pinned.get(name) is not None:
                return "pinned"
            return "measured" if avg is not None and avg.samples else "prior"

        return {
            "prefill_s_per_token": self.prefill_s_per_token(),
            "prefill_source": source("prefill_s_per_token", self.prefill),
            "attn_s_per_token_pair": self.attention.get(self.prior.attn_s_per_token_pair),
            "attn_source": source("attn", self.attention),
            "pass_s": self.passes.get(0.0),
            "links": {p: {"rtt_s": self.rtt_of(p), "bandwidth_Bps": self.bandwidth_of(p),
                          "ship_rtt_s": self.ship_rtt_of(p),
                          "ship_source": ("pinned" if self.pinned["rtt_s"] is not None else
                                          "measured" if p in self.ship_rtt else "passes"),
                          "ship_samples": self.ship_rtt[p].samples if p in self.ship_rtt else 0,
                          "rtt_samples": self.rtt[p].samples if p in self.rtt else 0,
                          "bandwidth_samples": (self.bandwidth[p].samples
                                                if p in self.bandwidth else 0)}
                      for p in sorted(self.peers())},
        }
