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

Requests without a plan keep the backend's own result untouched. An owner that
fails or does not answer within ``--tokenlake-query-timeout`` marks the request
failed: the rest of the forward pass skips its remote work, and after the pass
the request is retracted (its token is never committed) and re-admitted, so it
recomputes or pulls instead. Never a wrong token.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from sglang_tokenlake.attention import merge_states, partial_attention
from sglang_tokenlake.pool.surfaces import CacheHost, PoolView
from sglang_tokenlake.transport.peers import PeerAgent

logger = logging.getLogger(__name__)


@dataclass
class RemotePlan:
    """The prefix segments of one request that stay on other workers."""

    lease: str
    segment_size: int
    owners: dict[str, list[tuple[int, int]]]  # owner -> [(segment index, key)]
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
    """

    def __init__(self, host: CacheHost, view: PoolView, agent: PeerAgent, query_timeout: float,
                 counters: defaultdict[str, int]) -> None:
        self.host = host
        self.view = view
        self.agent = agent
        self.tree = host.tree
        self.S = host.segment_size
        self.query_timeout = query_timeout
        self.kvcache = host.kv_store()
        self.plans: dict[int, RemotePlan] = {}  # id(req) -> plan
        self.active: dict[int, tuple[Any, RemotePlan]] = {}  # req_pool_idx -> (req, plan)
        self.leases: dict[str, tuple[str, list[Any]]] = {}  # lease id -> (peer, locked nodes)
        self.pending_retract: list[tuple[Any, Any]] = []  # (batch, req) after a failed pass
        self.hooked = 0  # attention-hook calls in the current forward pass
        self.counters = counters

    # -- requester: plans ------------------------------------------------------------

    def new_plan(self, owners: dict[str, list[tuple[int, int]]]) -> RemotePlan:
        return RemotePlan(uuid.uuid4().hex, self.S, owners)

    def lease(self, plan: RemotePlan, deadline: float) -> bool:
        """Pin the plan's segments at their owners; all or nothing."""
        futs = {
            owner: self.agent.request(
                owner, "lease", {"from": self.view.self_id, "lease": plan.lease,
                                 "keys": [k for _, k in segs]},
                timeout=max(0.05, deadline - time.monotonic()))
            for owner, segs in plan.owners.items()
        }
        ok = True
        for owner, fut in futs.items():
            try:
                msg = fut.result(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
                ok &= bool(msg.header.get("ok"))
            except Exception as e:
                logger.info("TokenLake: lease at %s failed (%s)", owner, e)
                ok = False
        if not ok:
            self.release(plan)
            self.counters["lease_failures"] += 1
        return ok

    def release(self, plan: RemotePlan) -> None:
        for owner in plan.owners:
            self.agent.request(owner, "unlease", {"from": self.view.self_id, "lease": plan.lease},
                               timeout=5.0)

    def attach(self, req: Any, plan: RemotePlan) -> None:
        self.plans[id(req)] = plan
        self.counters["ship_requests"] += 1

    def detach(self, req: Any) -> None:
        plan = self.plans.pop(id(req), None)
        if plan is not None:
            self.release(plan)

    def plan_of(self, req: Any) -> Optional[RemotePlan]:
        return self.plans.get(id(req))

    # -- requester: forward passes -----------------------------------------------------

    def begin_forward(self, batch: Any) -> None:
        self.active = {}
        self.hooked = 0
        if not self.plans or batch is None:
            return
        for req in getattr(batch, "reqs", ()) or ():
            plan = self.plans.get(id(req))
            if plan is not None and req.kv.req_pool_idx is not None:
                self.active[int(req.kv.req_pool_idx)] = (req, plan)

    def end_forward(self, batch: Any) -> None:
        if self.active and not self.hooked:
            # The pass never reached the attention hook (a replayed CUDA graph, an
            # attention backend without the hook): its remote positions read the
            # padding slot. Nothing of it may be committed.
            self.counters["ship_unhooked_passes"] += 1
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
        deadline = time.monotonic() + self.query_timeout
        for owner, (fut, entries) in futs.items():
            try:
                msg = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                outs = self._unpack(msg, entries, layer, q.dtype)
            except Exception as e:
                for _, plan, _ in entries:
                    if not plan.failed:
                        plan.failed = True
                        self.counters["ship_failures"] += 1
                        self.view.suspect(owner)
                        logger.warning("TokenLake: owner %s failed a query (%s); the request "
                                       "will start over without it", owner, e)
                continue
            for (i, _, _), st in zip(entries, outs):
                parts[i].append(st)
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
        self.counters["query_bytes"] += buf.nbytes
        fut = self.agent.request(owner, "attend", header, [buf], timeout=self.query_timeout)
        return fut, entries

    def _unpack(self, msg: Any, entries: list, layer: Any, dtype: torch.dtype) -> list[Any]:
        from sglang_tokenlake.attention import AttentionState

        n = sum(int(qi.shape[0]) for _, _, qi in entries)
        Hq, Dv = layer.tp_q_head_num, layer.v_head_dim
        if len(msg.buffers) != 2:
            raise ValueError("attend reply needs output and LSE buffers")
        ob, lb = msg.buffers
        self.counters["partial_bytes"] += ob.nbytes + lb.nbytes
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
            self.counters["retracted_requests"] += 1
            logger.warning("TokenLake: request %s starts over (a remote owner failed)", req.rid)
        self.pending_retract = keep

    # -- owner side (broker thread) --------------------------------------------------------

    def serve_attend(self, req: Any) -> None:
        h, bufs = req.msg.header, req.msg.buffers
        try:
            dtype = getattr(torch, str(h["dtype"]))
            heads, dim, v_dim = int(h["heads"]), int(h["dim"]), int(h["v_dim"])
            layer_id, scale, cap = int(h["layer"]), float(h["scale"]), float(h.get("cap", 0.0))
            entries = h["reqs"]
            if not isinstance(dtype, torch.dtype) or len(bufs) != 1 or not isinstance(entries, list):
                raise ValueError("bad attend message")
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
            self.counters["malformed"] += 1
            req.error(f"attend: {e}")
            return
        outs, lses, off = [], [], 0
        for lease, n, keys in entries:
            n = int(n)
            held = self.leases.get(lease)
            slots = []
            for k in keys:
                node = self.tree.nodes.get(k)
                if held is None or node is None or node.value is None:
                    req.error(f"attend: segment {k:#x} is not leased here")
                    self.counters["attend_missing"] += 1
                    return
                base, off_ = node.value
                slots.append(base[off_ : off_ + self.S])
            st = partial_attention(q[off : off + n], k_buf, v_buf, torch.cat(slots), causal=False,
                                   scale=scale, logit_cap=cap)
            outs.append(st.o)
            lses.append(st.lse)
            off += n
        o = torch.cat(outs).to(dtype).contiguous().cpu()
        lse = torch.cat(lses).float().contiguous().cpu()
        self.counters["attend_served"] += len(entries)
        self.counters["partial_bytes_served"] += o.numel() * o.element_size() + lse.numel() * 4
        req.reply("partial", {}, [o.view(torch.uint8).numpy().reshape(-1),
                                  lse.view(torch.uint8).numpy().reshape(-1)])

    def grant_lease(self, peer: str, lease: str, keys: list[int]) -> bool:
        """Scheduler thread: pin ``keys`` for ``peer``'s request (all must be local)."""
        nodes = []
        for k in keys:
            node = self.tree.nodes.get(k)
            if node is None or node.value is None:
                for n in nodes:
                    self.tree.unlock(n)
                return False
            self.tree.lock(node)
            nodes.append(node)
        old = self.leases.pop(lease, None)
        if old is not None:
            for n in old[1]:
                self.tree.unlock(n)
        self.leases[lease] = (peer, nodes)
        return True

    def drop_lease(self, lease: str) -> None:
        held = self.leases.pop(lease, None)
        if held is not None:
            for n in held[1]:
                self.tree.unlock(n)

    def drop_peer_leases(self, peer: str) -> None:
        for lease, (p, _) in list(self.leases.items()):
            if p == peer:
                self.drop_lease(lease)
