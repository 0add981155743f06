#!/usr/bin/env python3
"""Split into k segments + merge versus one full attention over the same tokens.

For each mode, context length and k:
  full    one attention over all context tokens (one segment);
  split   decode: k equal segments; prefill: the cached prefix in k-1 segments + the block of new
          tokens as a causal segment; partials of all segments, then merge-state.
Both use the same backend (FlashInfer on CUDA when it imports, else the torch reference); plans are
built before timing, as in a forward pass (plan once per batch, run per layer). Reports the time
ratio split/full and the effective memory bandwidth, bytes of K+V read + Q read + O written over
the time, as a share of the device's peak (a table of known GPUs, or --peak-gbps). Writes JSON.

    python scripts/bench_kernels.py                      # CUDA: contexts 8K..128K
    python scripts/bench_kernels.py --device cpu         # small contexts, torch reference
    python scripts/bench_kernels.py --out out/kernels_bench.json --peak-gbps 3350
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sglang_tokenlake.attention import SegmentAttention, resolve_backend

# Peak HBM bandwidth, GB/s, matched in order against torch.cuda.get_device_name().
PEAK_GBPS = [
    (("H200",), 4800.0),
    (("H100", "PCIE"), 2000.0),
    (("H100", "NVL"), 3900.0),
    (("H100",), 3350.0),  # SXM (HBM3)
    (("A100", "80GB"), 2000.0),
    (("A100",), 1555.0),  # 40GB
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def peak_gbps(name: str) -> float | None:
    upper = name.upper()
    for keys, gbps in PEAK_GBPS:
        if all(k in upper for k in keys):
            return gbps
    return None


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--contexts", type=ints, default=None,
                   help="context lengths (default: 8K..128K on CUDA, 512..2048 on CPU)")
    p.add_argument("--segments", type=ints, default=[2, 4, 8], help="values of k")
    p.add_argument("--modes", default="decode,prefill")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="new tokens per prefill (default 512 on CUDA, 32 on CPU)")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", choices=["auto", "torch", "flashinfer"], default="auto")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="peak memory bandwidth in GB/s (default: from the GPU's name)")
    p.add_argument("--out", default="out/kernels_bench.json")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.contexts = a.contexts or ([8192, 16384, 32768, 65536, 131072] if cuda else [512, 1024, 2048])
    a.prefill_tokens = a.prefill_tokens or (512 if cuda else 32)
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    a.reps = a.reps if a.reps is not None else (20 if cuda else 3)
    return a


def timed_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of one call, ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def split_segments(slots: torch.Tensor, mode: str, k: int, n_q: int):
    """(segments, causal flags) of the split run."""
    if mode == "decode":
        return list(torch.tensor_split(slots, k)), [False] * k
    prefix, new = slots[: len(slots) - n_q], slots[len(slots) - n_q:]
    return [*torch.tensor_split(prefix, k - 1), new], [False] * (k - 1) + [True]


def bench_case(a: argparse.Namespace, device: torch.device, mode: str, ctx: int,
               peak: float | None) -> list[dict]:
    dtype = DTYPES[a.dtype]
    n_q = 1 if mode == "decode" else a.prefill_tokens
    g = torch.Generator(device=device).manual_seed(ctx)
    q = torch.randn(n_q, a.q_heads, a.head_dim, generator=g, device=device).to(dtype)
    k_buf = torch.randn(ctx, a.kv_heads, a.head_dim, generator=g, device=device).to(dtype)
    v_buf = torch.randn(ctx, a.kv_heads, a.head_dim, generator=g, device=device).to(dtype)
    slots = torch.arange(ctx, device=device)
    causal = mode == "prefill"
    full = SegmentAttention([slots], causal=causal, backend=a.backend)
    full_o = full.run(q, k_buf, v_buf).o[0]  # also builds the plan outside the timed loop
    full_ms = timed_ms(lambda: full.run(q, k_buf, v_buf), device, a.warmup, a.reps)

    elem = torch.finfo(dtype).bits // 8
    nbytes = (2 * ctx * a.kv_heads + 2 * n_q * a.q_heads) * a.head_dim * elem  # K,V + Q,O
    visible = ctx - (n_q - 1) / 2 if causal else ctx  # mean keys seen per query row
    flops = 4 * n_q * visible * a.q_heads * a.head_dim
    rows = []
    for k in a.segments:
        if k < 2 or (mode == "prefill" and ctx - n_q < k - 1):
            continue
        segs, flags = split_segments(slots, mode, k, n_q)
        split = SegmentAttention(segs, causal=flags, backend=a.backend)
        err = (split.merged(q, k_buf, v_buf).o.float() - full_o.float()).abs().max().item()
        split_ms = timed_ms(lambda s=split: s.merged(q, k_buf, v_buf), device, a.warmup, a.reps)
        row = {
            "mode": mode, "context": ctx, "segments": k, "n_q": n_q,
            "full_ms": full_ms, "split_ms": split_ms, "ratio": split_ms / full_ms,
            "bytes": nbytes,
            "full_gbps": nbytes / full_ms / 1e6, "split_gbps": nbytes / split_ms / 1e6,
            "full_tflops": flops / full_ms / 1e9, "split_tflops": flops / split_ms / 1e9,
            "max_abs_err": err,
        }
        for kind in ("full", "split"):
            row[f"{kind}_bw_share"] = row[f"{kind}_gbps"] / peak if peak else None
        rows.append(row)
    return rows


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (use --device cpu to exercise the script "
              "with the torch reference)")
        return 0
    device = torch.device(a.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    peak = a.peak_gbps if a.peak_gbps is not None else (
        peak_gbps(name) if device.type == "cuda" else None)
    probe = torch.empty(1, 1, a.head_dim, dtype=DTYPES[a.dtype], device=device)
    backend = resolve_backend(a.backend, probe)
    fi_version = None
    if backend == "flashinfer":
        import flashinfer

        fi_version = flashinfer.__version__
    print(f"device: {name or device.type}  backend: {backend}  dtype: {a.dtype}  "
          f"heads q/kv: {a.q_heads}/{a.kv_heads}  head_dim: {a.head_dim}  "
          f"peak: {f'{peak:.0f} GB/s' if peak else 'unknown'}")
    rows = []
    header = (f"{'mode':8}{'context':>9}{'k':>4}{'n_q':>6}{'full ms':>10}{'split ms':>10}"
              f"{'ratio':>7}{'full GB/s':>11}{'split GB/s':>11}{'full bw':>9}{'split bw':>9}"
              f"{'max err':>10}")
    print(header)
    for mode in a.modes.split(","):
        for ctx in a.contexts:
            for r in bench_case(a, device, mode, ctx, peak):
                rows.append(r)
                print(f"{r['mode']:8}{r['context']:>9}{r['segments']:>4}{r['n_q']:>6}"
                      f"{r['full_ms']:>10.3f}{r['split_ms']:>10.3f}{r['ratio']:>7.2f}"
                      f"{r['full_gbps']:>11.1f}{r['split_gbps']:>11.1f}"
                      f"{pct(r['full_bw_share']):>9}{pct(r['split_bw_share']):>9}"
                      f"{r['max_abs_err']:>10.2e}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": name, "device_type": device.type, "backend": backend,
        "flashinfer": fi_version, "torch": torch.__version__, "peak_gbps": peak,
        "config": {k: getattr(a, k) for k in ("dtype", "q_heads", "kv_heads", "head_dim",
                                             "prefill_tokens", "warmup", "reps")},
        "bytes_counted": "K+V read + Q read + O written, once (same for full and split)",
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
