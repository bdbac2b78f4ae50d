"""The chunked part of a seed layer's step (blend of running seeds + telemetry) on CUDA, four
providers side by side in one run, every shape of BENCHMARKS.md's kernel table:

- loop:    a per-seed Python loop (the naive design the chunked layer replaces)
- eager:   the vectorised PyTorch reference (`kasmina.kernels.reference`, the CPU path)
- compile: torch.compile of the eager reference
- ours:    the Triton custom ops (`kasmina::chunk_blend`, `kasmina::column_stats`)

Forward, and forward+backward (gradients to the host output and the blueprint outputs), timed
with triton.testing.do_bench (median) after a correctness check against the eager reference;
achieved bandwidth against a device-to-device copy ceiling measured in the same run; extra peak
memory. Writes benchmarks/results/layer_<gpu>_<date>.csv and prints the bars last.

    python3 benchmarks/bench_layer.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
from pathlib import Path

import torch
import triton.testing
from kasmina.kernels import ops, reference
from kasmina.layer import split_chunks

THR = 1e-6


def copy_ceiling_gbs() -> float:
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def make_case(hidden, rows, seeds, frac, dtype):
    chunks = split_chunks(hidden, seeds)
    width = max(e - s for s, e in chunks)
    n_active = 0 if frac == 0 else max(1, round(frac * seeds))
    active = torch.linspace(0, seeds - 1, n_active).round().long().unique().tolist()
    run_of = torch.full((hidden,), -1, dtype=torch.int32)
    bounds = torch.zeros(len(active), 2, dtype=torch.int32)
    feats = []
    for a, s in enumerate(active):
        lo, hi = chunks[s]
        run_of[lo:hi] = a
        bounds[a] = torch.tensor([lo, hi - lo])
        feats.append(torch.arange(lo, hi))
    common = math.gcd(16, *bounds.flatten().tolist())
    feat = torch.cat(feats) if feats else torch.zeros(0, dtype=torch.long)
    h = torch.randn(rows, hidden, device="cuda").to(dtype)
    y = torch.randn(len(active), rows, width, device="cuda")
    alpha = torch.rand(len(active), device="cuda") * 0.9 + 0.05
    meta = (feat.cuda(), run_of.cuda(), bounds.cuda(), common)  # gcd with 16: a power of two
    return chunks, active, h, y, alpha, meta


def providers(chunks, active, alpha, meta):
    feat, run_of, bounds, align = meta
    blending = len(active) > 0
    alpha_of = dict(zip(active, alpha.tolist(), strict=True))

    def eager(h, y):
        stats = reference.column_stats(h.detach(), THR)
        return (reference.chunk_blend(h, y, alpha, run_of, bounds) if blending else h), stats

    def ours(h, y):
        if not blending:
            return h, ops.column_stats(h.detach(), THR, triton=True)
        return ops.chunk_blend(h, y, alpha, run_of, bounds, True, THR, align,
                               triton=True)

    def loop(h, y):
        out = h.clone() if blending else h
        stats = []
        for i, (lo, hi) in enumerate(chunks):
            c = h[:, lo:hi].detach().float()
            stats.append(torch.stack([c.sum(), (c * c).sum(), (c.abs() < THR).sum()]))
            if i in alpha_of:
                a, k = alpha_of[i], active.index(i)
                out[:, lo:hi] = ((1 - a) * h[:, lo:hi].float() + a * y[k, :, : hi - lo]
                                 ).to(h.dtype)
        return out, torch.stack(stats)

    # Every case compiles the same code object anew: without a reset, dynamo's recompile
    # limit (8) silently falls back to eager after eight cases.
    torch._dynamo.reset()
    return {"loop": loop, "eager": eager, "compile": torch.compile(eager), "ours": ours}


def bench(fn, h, y, g, mode):
    if mode == "forward":
        def run():
            fn(h, y)
    else:
        def run():
            h.grad = y.grad = None
            out, _ = fn(h, y)
            out.backward(g)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(run, warmup=5, rep=40, return_mode="median")
    return ms, peak


def floor_bytes(h, y, active, mode):
    es = h.element_size()
    n, f = h.shape
    m = y.shape[0] * y.shape[2] if active else 0  # blended columns (padded width: upper bound)
    if not active:
        return n * f * es  # telemetry reads h once; the output is h itself
    fwd = 2 * n * f * es + n * m * 4  # read h, read y (active), write out
    if mode == "forward":
        return fwd
    return fwd + 2 * n * f * es + n * m * 4  # read g, write grad_h, write grad_y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    ceiling = copy_ceiling_gbs()
    print(f"{gpu}: device-to-device copy ceiling {ceiling:.0f} GB/s (read + write)", flush=True)
    rows_out = []
    shapes = [(hd, n, s, fr, dt) for dt in (torch.bfloat16, torch.float32) for hd in (1024, 4096)
              for n in (8192, 32768) for s in (1, 64, 1024, hd) for fr in (0.0, 0.1, 1.0)]
    if args.quick:
        shapes = [s for s in shapes if s[2] == 1024 and s[1] == 8192]
    for hidden, n, seeds, frac, dtype in shapes:
        chunks, active, h, y, alpha, meta = make_case(hidden, n, seeds, frac, dtype)
        fns = providers(chunks, active, alpha, meta)
        want = {"eager", "ours"}
        if seeds == 1024 and frac == 0.1:  # the rows the speed-up bars are about
            want |= {"loop", "compile"}
        ref_out, ref_stats = fns["eager"](h, y)
        for name in sorted(want - {"eager"}):
            out, stats = fns[name](h, y)
            tol = 8e-3 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
            if name != "loop":  # the loop reduces per seed, the others per feature
                torch.testing.assert_close(stats, ref_stats, rtol=1e-4, atol=1e-2)
            assert not torch.isnan(out).any()
        hh, yy = h.clone().requires_grad_(), y.clone().requires_grad_()
        g = torch.randn_like(h)
        for mode in ("forward", "forward+backward"):
            if mode != "forward" and not active:
                continue  # nothing to differentiate: the output is the host's
            for name in sorted(want):
                ms, peak = bench(fns[name], hh if mode != "forward" else h,
                                 yy if mode != "forward" else y, g, mode)
                gbs = floor_bytes(h, y, active, mode) / (ms * 1e-3) / 1e9
                row = {"date": datetime.date.today().isoformat(), "gpu": gpu,
                       "dtype": str(dtype).removeprefix("torch."), "hidden": hidden, "rows": n,
                       "seeds": seeds, "active": frac, "mode": mode, "provider": name,
                       "ms": round(ms, 5), "gb_per_s": round(gbs, 1),
                       "of_copy_ceiling": round(gbs / ceiling, 3),
                       "extra_peak_mib": round(peak / 2**20, 1)}
                rows_out.append(row)
                print(f"{row['dtype']:<9}{hidden:>5} x {n:<6} seeds {seeds:<5} active {frac:<4}"
                      f"{mode:<17}{name:<8} {ms:9.4f} ms {gbs:8.0f} GB/s "
                      f"({row['of_copy_ceiling']:.2f})  +{row['extra_peak_mib']} MiB",
                      flush=True)
        del h, y, hh, yy, g
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = gpu.replace(" ", "_").lower()
    path = out / f"layer_{tag}_{datetime.date.today().isoformat()}.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        w.writeheader()
        w.writerows(rows_out)
    print(f"\nwrote {path}\n\nbars (BENCHMARKS.md), ratios from this run:")
    by = {(r["dtype"], r["hidden"], r["rows"], r["seeds"], r["active"], r["mode"],
           r["provider"]): r for r in rows_out}
    for key, r in by.items():
        dt, hd, n, s, fr, mode, prov = key
        if prov == "ours" and s == 1024 and fr == 0.1 and mode == "forward+backward":
            ratios = {o: by[(dt, hd, n, s, fr, mode, o)]["ms"] / r["ms"]
                      for o in ("loop", "eager", "compile") if (dt, hd, n, s, fr, mode, o) in by}
            print(f"  {dt:<9}{hd}x{n}: loop/ours {ratios.get('loop', 0):7.1f} (>=100)  "
                  f"eager/ours {ratios.get('eager', 0):5.2f} (>=5)  "
                  f"compile/ours {ratios.get('compile', 0):5.2f} (>=1.5)")
        if prov == "ours" and mode == "forward" and fr > 0 and hd * n * 2 >= 64 * 2**20:
            print(f"  {dt:<9}{hd}x{n} seeds {s} active {fr}: forward {r['of_copy_ceiling']:.2f}"
                  f" of copy ceiling (>=0.80)")
        if prov == "ours" and mode == "forward" and hd == 1024 and n == 8192:
            print(f"  {dt:<9}1024x8192 seeds {s} active {fr}: {r['ms'] * 1e3:.1f} us (<=20)")


if __name__ == "__main__":
    main()
