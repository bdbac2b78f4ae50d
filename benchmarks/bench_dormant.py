"""Dormant-layer overhead: a KasminaLayer whose seeds are all dormant versus the bare nn.Linear
it wraps, forward and forward+backward (+ the seed step), with telemetry every step and every
10th step, and peak memory. This is the PyTorch reference path (the Triton kernels are a later
issue); the CUDA rows are the baseline those kernels must beat.

Baseline and candidate alternate in the same run (`rounds` interleaved blocks; the median of the
per-block times is reported), inputs are random, and the dormant output is checked bit-identical
to the host's before timing. Writes benchmarks/results/dormant_<device>_<date>.csv.

    .venv/bin/python benchmarks/bench_dormant.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
from kasmina import KasminaConfig, KasminaLayer
from torch import nn


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def block_time(fn, reps: int, device: str) -> float:
    """Mean seconds per call over `reps` calls (CUDA events on the GPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def peak_bytes(fn, device: str) -> int:
    """Peak over 10 calls, so a telemetry step (every 10th at most) is among them."""
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    dev = args.device
    rounds, reps = (2, 2) if args.quick else (5, 5)
    if dev == "cuda":
        reps *= 2
        shapes = [(h, n, s, dt) for dt in (torch.float32, torch.bfloat16)
                  for h in (1024, 4096) for n in (8192, 32768) for s in (1, 64, 1024, h)]
    else:
        shapes = [(4096, 256, s, torch.float32) for s in (8, 256, 4096)]
        shapes += [(1024, 2048, s, torch.float32) for s in (8, 256, 1024)]
    if args.quick:
        shapes = shapes[::3]
    torch.manual_seed(0)
    machine = machine_name(dev)
    rows = []
    for hidden, n, seeds, dtype in shapes:
        host = nn.Linear(hidden, hidden, device=dev, dtype=dtype)
        x = torch.randn(n, hidden, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn(n, hidden, device=dev, dtype=dtype)
        for every in (1, 10):
            layer = KasminaLayer(host, seeds, KasminaConfig(telemetry_every=every)).train()
            with torch.no_grad():
                assert torch.equal(layer(x), host(x)), "a dormant layer must be the host"

            def fwd(m, x=x):
                def run():
                    m(x)
                    if isinstance(m, KasminaLayer):
                        m.step()  # advances the telemetry_every clock
                return run

            def fwd_bwd(m, x=x, g=g):
                def run():
                    m(x).backward(g)
                    if isinstance(m, KasminaLayer):
                        m.step()
                return run

            for mode, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
                base_fn, cand_fn = make(host), make(layer)
                for fn in (base_fn, cand_fn):  # warm-up
                    fn()
                base, cand = [], []
                for _ in range(rounds):  # alternate so machine drift hits both alike
                    base.append(block_time(base_fn, reps, dev))
                    cand.append(block_time(cand_fn, reps, dev))
                b, c = statistics.median(base), statistics.median(cand)
                mb, mc = peak_bytes(base_fn, dev), peak_bytes(cand_fn, dev)
                rows.append({
                    "date": datetime.date.today().isoformat(), "machine": machine,
                    "gpu": machine if dev == "cuda" else "none (CPU)",
                    "dtype": str(dtype).removeprefix("torch."), "hidden": hidden, "rows": n,
                    "seeds": seeds, "telemetry_every": every, "mode": mode,
                    "host_ms": round(b * 1e3, 4), "dormant_ms": round(c * 1e3, 4),
                    "time_ratio": round(c / b, 3),
                    "peak_mem_ratio": round(mc / mb, 4) if mb else ""})
                r = rows[-1]
                print(f"{r['dtype']:<9}{hidden:>5} x {n:<6} seeds {seeds:<5} every {every:<3}"
                      f"{mode:<17} host {r['host_ms']:>9.3f} ms  dormant {r['dormant_ms']:>9.3f}"
                      f" ms  ratio {r['time_ratio']:.3f}  mem {r['peak_mem_ratio']}", flush=True)
            x.grad = None
            host.zero_grad(set_to_none=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if dev == "cuda" else "cpu"
    path = out / (f"dormant_{tag}_{datetime.date.today().isoformat()}"
                  f"{'_quick' if args.quick else ''}.csv")
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nmachine: {machine}\nwrote {path}")


if __name__ == "__main__":
    main()
