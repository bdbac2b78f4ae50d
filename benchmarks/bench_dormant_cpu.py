"""Dormant-layer overhead on the CPU: a KasminaLayer whose seeds are all dormant versus the bare
nn.Linear it wraps, forward and forward+backward, at 8, 256 and 4,096 seeds.

Baseline and candidate alternate in the same run (`rounds` interleaved blocks; the median of
per-block medians is reported), inputs are random, and outputs are checked bit-identical before
timing. Writes benchmarks/results/dormant_cpu_<date>.csv and prints a table.

    .venv/bin/python benchmarks/bench_dormant_cpu.py [--quick]
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
from torch import nn

from kasmina import KasminaConfig, KasminaLayer


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn, reps: int) -> float:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(host: nn.Linear, layer: KasminaLayer, x: torch.Tensor, g: torch.Tensor,
            mode: str, rounds: int, reps: int) -> tuple[float, float]:
    def fwd(m):
        with torch.no_grad():
            m(x)

    def fwd_bwd(m):
        m(x).backward(g)
        if isinstance(m, KasminaLayer):
            m.step()

    fn = fwd if mode == "forward" else fwd_bwd
    base, cand = [], []
    for _ in range(rounds):  # alternate so drift in machine load hits both alike
        base.append(timed(lambda: fn(host), reps))
        cand.append(timed(lambda: fn(layer), reps))
    return statistics.median(base), statistics.median(cand)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    rounds, reps = (2, 3) if args.quick else (5, 7)
    torch.manual_seed(0)
    shapes = [(4096, 256, s) for s in (8, 256, 4096)] + [(1024, 2048, s) for s in (8, 256, 1024)]
    rows = []
    machine = f"{cpu_name()} ({torch.get_num_threads()} threads)"
    for hidden, n, seeds in shapes:
        host = nn.Linear(hidden, hidden)
        x, g = torch.randn(n, hidden), torch.randn(n, hidden)
        for every in (1, 10):
            layer = KasminaLayer(host, seeds, KasminaConfig(telemetry_every=every)).train()
            with torch.no_grad():
                assert torch.equal(layer(x), host(x)), "dormant layer must be the host"
            for mode in ("forward", "forward+backward"):
                if mode == "forward" and every == 10:
                    continue  # no_grad forward in train mode: telemetry cost is the every=1 row
                b, c = measure(host, layer, x, g, mode, rounds, reps)
                rows.append({"date": datetime.date.today().isoformat(), "machine": machine,
                             "gpu": "none (CPU)", "hidden": hidden, "rows": n, "seeds": seeds,
                             "telemetry_every": every, "mode": mode,
                             "host_ms": round(b * 1e3, 3), "dormant_ms": round(c * 1e3, 3),
                             "ratio": round(c / b, 3)})
                r = rows[-1]
                print(f"{hidden:>6} x {n:<5} seeds {seeds:<5} every {every:<3} {mode:<17} "
                      f"host {r['host_ms']:>9.3f} ms  dormant {r['dormant_ms']:>9.3f} ms  "
                      f"ratio {r['ratio']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dormant_cpu_{datetime.date.today().isoformat()}{'_quick' if args.quick else ''}.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nmachine: {machine}\nwrote {path}")


if __name__ == "__main__":
    main()
