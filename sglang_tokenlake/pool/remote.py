"""Query-centric attention: ship a request's queries to the owners of its prefix segments.

A request admitted with a *remote plan* has prefix segments that stay on other
workers. Its row in ``req_to_token`` points those positions at the padding
slot 0, so no local memory is spent on them::

    positions:  | seg 0 (owner B) | seg 1 (local) | seg 2 (owner C) | new tokens |
    row slots:  |  0 0 0 ... 0    |  17 18 ...    |  0 0 0 ... 0    |  40 41 ... |

Per layer, after RoPE, the attention backend's output for such a request is
replaced by the merge of (FlashInfer convention, LSE base 2):

* the local partial: its queries against its local positions (local prefix
  segments + the causal block of new tokens), and
* one partial per owner: the owner attends the same queries to its segments
  (``attend`` message) and returns (output, LSE).

Requests without a plan keep the backend's own result untouched. Queries leave
for the owners before the local partial is computed, so both overlap. The waits
of one forward pass on its owners add up to at most ``--tokenlake-query-timeout``
(a budget per pass, not per layer); an owner that fails or does not answer
within what is left marks the request failed: the rest of the forward pass skips
its remote work, and after the pass the request is retracted (its token is never
committed) and re-admitted, so it recomputes or pulls instead. Never a wrong token.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from sglang_tokenlake.attention import merge_states, partial_attention
from sglang_tokenlake.counters import Counters
from sglang_tokenlake.pool.calibration import Calibration
from sglang_tokenlake.pool.leases import DIGEST_BYTES, LeaseTable, Releases
from sglang_tokenlake.pool.limits import check_keys
from sglang_tokenlake.pool.requests import RequestTable
from sglang_tokenlake.pool.surfaces import CacheHost, PoolView
from sglang_tokenlake.transport.peers import PeerAgent

logger = logging.getLogger(__name__)


@dataclass
class RemotePlan:
    """The prefix segments of one request that stay on other workers."""

    lease: str
    segment_size: int
    owners: dict[str, list[tuple[int, int]]]  # owner -> [(segment index, key)]
    digests: dict[int, bytes] = field(default_factory=dict)  # key -> token digest
    failed: bool = False
    remote_positions: Optional[torch.Tensor] = None  # bool mask cache, grown on demand
    _local_cache: dict[int, torch.Tensor] = field(default_factory=dict)

    def segments(self) -> list[tuple[int, int]]:
        return sorted(s for segs in self.owners.values() for s in segs)

    def remote_tokens(self) -> int:
        return sum(len(s) for s in self.owners.values()) * self.segment_size

    def local_positions(self, seq_len: int) -> torch.Tensor:
        """Positions ``< seq_len`` whose KV is local (ascending)."""
        cached = self._local_cache.get(seq_len)
        if cached is None:
            mask = torch.ones(seq_len, dtype=torch.bool)
            S = self.segment_size
            for idx, _ in self.segments():
                mask[idx * S : (idx + 1) * S] = False
            cached = torch.nonzero(mask).flatten()
            self._local_cache = {seq_len: cached}
        return cached


class RemoteAttention:
    """Requester and owner sides of query shipping for one worker.

    Args:
        host: the worker's cache (tree, request-to-slot table, KV memory).
        view: members (``self_id``, ``suspect``).
        agent: requests to peers.
        query_timeout: seconds an owner may take to answer one layer's queries.
        counters: the pool's counters.
        lease_ttl: seconds a lease granted here lives without a query under it.
    """

    def __init__(self, host: CacheHost, view: PoolView, agent: PeerAgent, query_timeout: float,
                 counters: Counters, lease_ttl: float = 60.0) -> None:
        self.host = host
        self.view = view
        self.agent = agent
        self.tree = host.tree
        self.S = host.segment_size
        self.query_timeout = query_timeout
        self.kvcache = host.kv_store()
        self.plans: RequestTable[RemotePlan] = RequestTable(self.release)  # req -> plan
        self.active: dict[int, tuple[Any, RemotePlan]] = {}  # req_pool_idx -> (req, plan)
        self.leases = LeaseTable(self.tree, lease_ttl, counters)  # granted here
        self.releases = Releases(self._send_unlease, self.view.usable, host.submit, counters)
        self.pending_retract: list[tuple[Any, Any]] = []  # (batch, req) after a failed pass
        self.hooked = 0  # attention-hook calls in the current forward pass
        self.wait_budget = query_timeout  # seconds the current pass may still wait on owners
        self.calibration: Optional[Calibration] = None  # measures served attention (set by the link)
        self.counters = counters

    # -- requester: plans ------------------------------------------------------------

    def new_plan(self, owners: dict[str, list[tuple[int, int]]],
                 digests: dict[int, bytes]) -> RemotePlan:
        return RemotePlan(uuid.uuid4().hex, self.S, owners, digests)

    def lease(self, plan: RemotePlan, deadline: float) -> bool:
        """Pin the plan's segments at their owners; all or nothing."""
        futs = {
            owner: self.agent.request(
                owner, "lease", {"from": self.view.self_id, "lease": plan.lease,
                                 "keys": [k for _, k in segs],
                                 "digests": [plan.digests[k] for _, k in segs]},
                # The scheduler thread waits for the answer itself: no agent hand-off.
                timeout=max(0.05, deadline - time.monotonic()), direct=True)
            for owner, segs in plan.owners.items()
        }
        ok = True
        for owner, fut in futs.items():
            try:
                msg = fut.result(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
                if not msg.header.get("ok"):
                    logger.info("TokenLake: %s refused a lease (%s)", owner,
                                msg.header.get("reason"))
                    ok = False
            except Exception as e:
                logger.info("TokenLake: lease at %s failed (%s)", owner, e)
                ok = False
        if not ok:
            self.release(plan)
            self.counters.add("lease_failures")
        return ok

    def release(self, plan: RemotePlan) -> None:
        for owner in plan.owners:
            self.releases.release(owner, plan.lease)

    def _send_unlease(self, owner: str, lease: str) -> Future:
        return self.agent.request(owner, "unlease", {"from": self.view.self_id, "lease": lease},
                                  timeout=5.0)

    def attach(self, req: Any, plan: RemotePlan) -> None:
        old = self.plans.get(req)
        if old is not None and old is not plan:
            self.release(old)  # re-admitted (after a retraction) with a new plan
        self.plans.set(req, plan)
        self.counters.add("ship_requests")

    def end_all(self) -> None:
        """The cache was flushed: end the leases granted here, release those held elsewhere."""
        self.leases.end_all()
        for plan in self.plans.values():
            self.release(plan)
        self.plans.clear()
        self.active = {}
        self.pending_retract = []

    def held_at(self) -> dict[str, int]:
        """Leases this worker's requests hold, per owner."""
        out: dict[str, int] = defaultdict(int)
        for plan in self.plans.values():
            for owner in plan.owners:
                out[owner] += 1
        return dict(out)

    def detach(self, req: Any) -> None:
        plan = self.plans.pop(req)
        if plan is not None:
            self.release(plan)

    def plan_of(self, req: Any) -> Optional[RemotePlan]:
        return self.plans.get(req)

    # -- requester: forward passes -----------------------------------------------------

    def begin_forward(self, batch: Any) -> None:
        self.active = {}
        self.hooked = 0
        self.wait_budget = self.query_timeout
        if not self.plans or batch is None:
            return
        for req in getattr(batch, "reqs", ()) or ():
            plan = self.plans.get(req)
            if plan is not None and req.kv.req_pool_idx is not None:
                self.active[int(req.kv.req_pool_idx)] = (req, plan)

    def end_forward(self, batch: Any) -> None:
        if self.active and not self.hooked:
            # The pass never reached the attention hook (a replayed CUDA graph, an
            # attention backend without the hook): its remote positions read the
            # padding slot. Nothing of it may be committed.
            self.counters.add("ship_unhooked_passes")
            logger.error("TokenLake: a forward pass with shipped segments bypassed the "
                         "attention hook; its requests start over")
            for _, plan in self.active.values():
                plan.failed = True
        for req, plan in self.active.values():
            if plan.failed:
                req.is_retracted = True  # the result processor commits nothing for it
                self.pending_retract.append((batch, req))
        self.active = {}

    def replace_outputs(self, q: torch.Tensor, o: torch.Tensor, layer: Any, fb: Any,
                        decode: bool, apply_cap: bool) -> None:
        """Overwrite ``o`` rows of requests with a remote plan by the merged attention."""
        self.hooked += 1
        rpi = fb.req_pool_indices.tolist()
        rows = [(i, *self.active[p]) for i, p in enumerate(rpi) if p in self.active]
        if not rows:
            return
        Hq, D = layer.tp_q_head_num, layer.qk_head_dim
        q3 = q.reshape(-1, Hq, D)
        o3 = o.view(-1, Hq, layer.v_head_dim)
        seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        if decode:
            n_q = [1] * len(rpi)
        else:
            n_q = list(fb.extend_seq_lens_cpu)
        starts = np.concatenate([[0], np.cumsum(n_q)]).tolist()
        scale = layer.scaling
        cap = float(getattr(layer, "logit_cap", 0.0) or 0.0) if apply_cap else 0.0
        # 1. ship queries, one message per owner for all of its requests
        by_owner: dict[str, list[tuple[int, RemotePlan, torch.Tensor]]] = defaultdict(list)
        for i, _, plan in rows:
            if plan.failed:
                continue
            qi = q3[starts[i] : starts[i] + n_q[i]]
            for owner in plan.owners:
                by_owner[owner].append((i, plan, qi))
        futs = {owner: self._ship(owner, layer, scale, cap, entries)
                for owner, entries in by_owner.items()}
        # 2. local partials while the owners work
        k_buf = self.kvcache.get_key_buffer(layer.layer_id)
        v_buf = self.kvcache.get_value_buffer(layer.layer_id)
        req_to_token = self.host.req_to_token()
        local: dict[int, Any] = {}
        for i, _, plan in rows:
            qi = q3[starts[i] : starts[i] + n_q[i]]
            pos = plan.local_positions(int(seq_lens[i]))
            slots = req_to_token[rpi[i]].index_select(0, pos.to(req_to_token.device))
            local[i] = partial_attention(qi, k_buf, v_buf, slots.long(), causal=True,
                                         scale=scale, logit_cap=cap)
        # 3. gather the owners' partials, merge
        parts: dict[int, list[Any]] = {i: [local[i]] for i, _, _ in rows}
        # One budget per forward pass: waits of all its layers add up to at most
        # query_timeout, so a slow owner fails its requests within one budget.
        waited = time.monotonic()
        deadline = waited + self.wait_budget
        for owner, (fut, entries) in futs.items():
            try:
                msg = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                outs = self._unpack(msg, entries, layer, q.dtype)
            except Exception as e:
                for _, plan, _ in entries:
                    if not plan.failed:
                        plan.failed = True
                        self.counters.add("ship_failures")
                        self.view.suspect(owner)
                        logger.warning("TokenLake: owner %s failed a query (%s); the request "
                                       "will start over without it", owner, e)
                continue
            for (i, _, _), st in zip(entries, outs):
                parts[i].append(st)
        self.wait_budget = max(0.0, self.wait_budget - (time.monotonic() - waited))
        for i, _, plan in rows:
            if plan.failed:
                continue  # retracted after the pass; its rows are never used
            merged = merge_states(parts[i]) if len(parts[i]) > 1 else parts[i][0]
            o3[starts[i] : starts[i] + n_q[i]] = merged.o.to(o3.dtype)

    def _ship(self, owner: str, layer: Any, scale: float, cap: float,
              entries: list[tuple[int, RemotePlan, torch.Tensor]]) -> tuple[Future, list]:
        qs = torch.cat([qi for _, _, qi in entries]).contiguous().cpu()
        header = {
            "from": self.view.self_id, "layer": int(layer.layer_id), "scale": float(scale),
            "cap": cap, "dtype": str(qs.dtype).replace("torch.", ""), "heads": int(qs.shape[1]),
            "dim": int(qs.shape[2]), "v_dim": int(layer.v_head_dim),
            "reqs": [[plan.lease, int(qi.shape[0]), [k for _, k in plan.owners[owner]]]
                     for _, plan, qi in entries],
        }
        buf = qs.view(torch.uint8).numpy().reshape(-1)
        self.counters.add("query_bytes", buf.nbytes)
        # Direct: this (scheduler) thread sends and, after its local partial, reads the
        # reply itself; no hand-off to the agent thread on a forward pass's path.
        fut = self.agent.request(owner, "attend", header, [buf], timeout=self.query_timeout,
                                 direct=True)
        sent = time.monotonic()

        def timed(f: Future) -> None:  # the owner's answer, queueing included, once read
            if f.exception() is None:
                self.calibration.observe_ship(owner, time.monotonic() - sent)

        fut.add_done_callback(timed)
        return fut, entries

    def _unpack(self, msg: Any, entries: list, layer: Any, dtype: torch.dtype) -> list[Any]:
        from sglang_tokenlake.attention import AttentionState

        n = sum(int(qi.shape[0]) for _, _, qi in entries)
        Hq, Dv = layer.tp_q_head_num, layer.v_head_dim
        if len(msg.buffers) != 2:
            raise ValueError("attend reply needs output and LSE buffers")
        ob, lb = msg.buffers
        self.counters.add("partial_bytes", ob.nbytes + lb.nbytes)
        o = torch.frombuffer(bytearray(ob), dtype=dtype)
        lse = torch.frombuffer(bytearray(lb), dtype=torch.float32)
        if o.numel() != n * Hq * Dv or lse.numel() != n * Hq:
            raise ValueError("attend reply has the wrong size")
        o, lse = o.view(n, Hq, Dv), lse.view(n, Hq)
        dev = self.kvcache.get_key_buffer(layer.layer_id).device
        out, off = [], 0
        for _, _, qi in entries:
            m = int(qi.shape[0])
            out.append(AttentionState(o[off : off + m].to(dev), lse[off : off + m].to(dev)))
            off += m
        return out

    # -- requester: retraction after a failed pass ------------------------------------------

    def retract_failed(self, scheduler: Any, batch: Any) -> None:
        """After the result of ``batch`` was processed: requeue requests that failed in it."""
        keep = []
        for b, req in self.pending_retract:
            if b is not batch:
                keep.append((b, req))
                continue
            if req not in batch.reqs:
                continue
            idx = batch.reqs.index(req)
            batch.release_req(idx, len(batch.reqs) - 1, offload_kv=False)
            batch.filter_batch(reqs_to_exclude=[req])
            if getattr(scheduler, "chunked_req", None) is req:
                scheduler.chunked_req = None  # its remaining chunks start over with it
            scheduler._add_request_to_queue(req, is_retracted=True)
            self.counters.add("retracted_requests")
            logger.warning("TokenLake: request %s starts over (a remote owner failed)", req.rid)
        self.pending_retract = keep

    # -- owner side (broker thread) --------------------------------------------------------

    def handlers(self, known_sender: Callable[[Any], Optional[str]]) -> dict[str, Callable]:
        """``lease``, ``unlease`` and ``attend``, for requests from live members only."""

        def on_lease(req: Any) -> None:
            peer = known_sender(req)
            if peer is None:
                return
            h = req.msg.header
            lease, keys, digests = h.get("lease"), h.get("keys"), h.get("digests")
            why = check_keys(keys)
            if why is not None:
                self.counters.add("malformed")
                req.error(f"lease: {why}")
                return
            if not (isinstance(lease, str) and 0 < len(lease) <= 64 and isinstance(digests, list)
                    and len(digests) == len(keys)
                    and all(isinstance(d, bytes) and len(d) == DIGEST_BYTES for d in digests)):
                self.counters.add("malformed")
                req.error("lease: needs a lease id, a list of keys and a digest per key")
                return
            # Granted here, on the broker thread: never waits for this worker's scheduler.
            with self.host.slot_mutex:
                why = self.leases.grant(peer, lease, keys, digests)
            self.counters.add("leases_refused" if why else "leases_granted")
            req.reply("lease", {"ok": why is None, **({"reason": why} if why else {})})

        def on_unlease(req: Any) -> None:
            peer = known_sender(req)
            if peer is None:
                return
            lease = req.msg.header.get("lease")
            if not isinstance(lease, str):
                self.counters.add("malformed")
                req.error("unlease: needs a lease id")
                return
            self.leases.release(lease, peer)  # ended by the scheduler at its next poll
            req.reply("ok")  # also for a lease unknown here: releasing is idempotent

        def on_attend(req: Any) -> None:
            peer = known_sender(req)
            if peer is None:
                return
            with self.host.slot_mutex:
                self.serve_attend(req, peer)

        return {"lease": on_lease, "unlease": on_unlease, "attend": on_attend}

    def serve_attend(self, req: Any, peer: str) -> None:
        """Answer ``peer``'s queries (broker thread, slot mutex held)."""
        h, bufs = req.msg.header, req.msg.buffers
        try:
            dtype = getattr(torch, str(h["dtype"]))
            heads, dim, v_dim = int(h["heads"]), int(h["dim"]), int(h["v_dim"])
            layer_id, scale, cap = int(h["layer"]), float(h["scale"]), float(h.get("cap", 0.0))
            entries = h["reqs"]
            if not isinstance(dtype, torch.dtype) or len(bufs) != 1 or not isinstance(entries, list):
                raise ValueError("bad attend message")
            for e in entries:
                if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                        and isinstance(e[1], int) and e[1] > 0 and isinstance(e[2], list)
                        and e[2] and all(isinstance(k, int) for k in e[2])):
                    raise ValueError("each request needs [lease, queries, keys]")
            total = sum(int(e[1]) for e in entries)
            if bufs[0].nbytes != total * heads * dim * torch.empty((), dtype=dtype).element_size():
                raise ValueError("query buffer size disagrees with the header")
            q = torch.frombuffer(bytearray(bufs[0]), dtype=dtype).view(total, heads, dim)
            k_buf = self.kvcache.get_key_buffer(layer_id)
            v_buf = self.kvcache.get_value_buffer(layer_id)
            if k_buf.shape[-1] != dim or v_buf.shape[-1] != v_dim or heads % k_buf.shape[1]:
                raise ValueError("query shape does not fit this worker's KV layout")
            q = q.to(k_buf.device)
        except Exception as e:
            self.counters.add("malformed")
            req.error(f"attend: {e}")
            return
        started = time.perf_counter()
        pairs = 0
        outs, lses, off = [], [], 0
        for lease, n, keys in entries:
            n = int(n)
            why = self.leases.use(lease, peer, keys)
            if why is not None:
                req.error(f"attend: {why}")
                self.counters.add("attend_missing")
                return
            slots = []
            for k in keys:
                node = self.tree.nodes.get(k)
                if node is None or node.value is None:
                    req.error(f"attend: segment {k:#x} is not leased here")
                    self.counters.add("attend_missing")
                    return
                base, off_ = node.value
                slots.append(base[off_ : off_ + self.S])
            st = partial_attention(q[off : off + n], k_buf, v_buf, torch.cat(slots), causal=False,
                                   scale=scale, logit_cap=cap)
            outs.append(st.o)
            lses.append(st.lse)
            off += n
            pairs += n * len(keys) * self.S
        o = torch.cat(outs).to(dtype).contiguous().cpu()
        lse = torch.cat(lses).float().contiguous().cpu()
        if self.calibration is not None:
            self.calibration.observe_attention(pairs, 1, time.perf_counter() - started)
        self.counters.add("attend_served", len(entries))
        self.counters.add("partial_bytes_served", o.numel() * o.element_size() + lse.numel() * 4)
        req.reply("partial", {}, [o.view(torch.uint8).numpy().reshape(-1),
                                  lse.view(torch.uint8).numpy().reshape(-1)])
