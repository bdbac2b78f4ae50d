"""Continuous benchmarking of the training step on the CPU (issue #19, the plan's risk section):
`make bench` runs it and fails when a mode's cost relative to the bare host has grown.

The whole step of benchmarks/bench_step.py (forward, backward against a fixed cotangent, SGD
over the host, `layer.step`), its functions imported, one thread, float32, 64 seeds, at a few
small shapes, in modes bare, dormant10 (every seed dormant, telemetry every 10th step),
training and graft10 (10 % of the seeds TRAINING / GRAFTING, telemetry every step). Rounds
are interleaved (one block of 10 steps per mode in turn, so drift of a shared machine hits
every mode alike) and timed in process CPU time, not wall time: on the loaded 2-core machine
the per-round ratios' inter-quartile range was about +-20 % in wall time and +-5 % in CPU time
(30 rounds, 2026-12-01), since time spent descheduled is not the step's. A row's ratio is the
median over rounds of (mode block / bare block of the same round), and its spread the
inter-quartile range of those per-round ratios. Ratios, not times, are compared, so the check
survives a slower or busier machine.

A row regresses when ratio > baseline ratio * (1 + tolerance); the baseline and the tolerance
live in benchmarks/results/regress_baseline_cpu.json (written by `--record`, which keeps the
file's tolerance and its reason). Exit status 1 on a regression (one line per row), 2 when
there is no baseline to compare with, else 0. Rounds stop at `--seconds` (at least 3 a shape),
so the run is bounded.

    .venv/bin/python benchmarks/bench_regress.py [--record] [--rounds 30] [--seconds 40]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "results" / "regress_baseline_cpu.json"
SHAPES = ((256, 256), (1024, 128))  # (hidden, rows)
SEEDS, REPS, WARMUP, MIN_ROUNDS = 64, 10, 11, 3
MODES = ("bare", "dormant10", "training", "graft10")
DEFAULT_TOLERANCE = 0.25  # the file's own value wins; see its tolerance_reason


def compare(baseline: dict[str, float], ratios: dict[str, float], tolerance: float) -> list[str]:
    """One line per regressed row: a ratio above baseline * (1 + tolerance), or a baseline row
    the run did not measure (a check that silently shrank would pass everything). Rows new in
    the run have nothing to regress from and pass."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    out = []
    for key, base in sorted(baseline.items()):
        got = ratios.get(key)
        if got is None:
            out.append(f"REGRESSION {key}: in the baseline ({base:.3f}) but not measured")
        elif got > base * (1 + tolerance):
            out.append(f"REGRESSION {key}: ratio to bare {got:.3f} > {base:.3f} * "
                       f"(1 + {tolerance:g}) = {base * (1 + tolerance):.3f}")
    return out


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4)  # >= MIN_ROUNDS points
    return q1, q2, q3


def measure(rounds: int, seconds: float) -> dict[str, dict]:
    """'HIDDENxROWS mode' -> {ratio, iqr, rounds, bare_cpu_ms}, modes other than bare."""
    import torch  # here, not at the top: `--help` needs no environment
    from torch import nn

    sys.path.insert(0, str(HERE))
    from bench_step import S, block, build_layer, make_modes, train_step

    torch.set_num_threads(1)  # as bench_step on the CPU: the machine is shared
    torch.manual_seed(0)
    n, rows, share = max(1, round(0.1 * SEEDS)), {}, seconds / len(SHAPES)
    for hidden, n_rows in SHAPES:
        host = nn.Linear(hidden, hidden)
        stages = {"dormant10": (n, 10, ()), "training": (n, 1, (S.TRAINING,)),
                  "graft10": (n, 1, (S.TRAINING, S.GRAFTING))}
        tpl = {"host": host} | {k: build_layer(host, SEEDS, *v) for k, v in stages.items()}
        modes = make_modes(tpl, SEEDS, torch.float32, "cpu", set(MODES))
        gen = torch.Generator().manual_seed(hidden + n_rows)
        xs = [torch.randn(n_rows, hidden, generator=gen).requires_grad_() for _ in range(2)]
        gs = [torch.randn(n_rows, hidden, generator=gen) / n_rows for _ in range(2)]
        for m in modes.values():
            for i in range(WARMUP):
                train_step(m, xs[i % 2], gs[i % 2])
        times, t0 = {name: [] for name in modes}, time.perf_counter()
        for r in range(rounds):  # interleaved: drift of the machine hits every mode alike
            if r >= MIN_ROUNDS and time.perf_counter() - t0 > share:
                break
            for name, m in modes.items():
                times[name].append(block(m, xs, gs, r * REPS, REPS, False)[2])  # CPU s
        bare = times["bare"]
        for name in MODES[1:]:
            q1, q2, q3 = quartiles([t / b for t, b in zip(times[name], bare, strict=True)])
            rows[f"{hidden}x{n_rows} {name}"] = {
                "ratio": round(q2, 4), "iqr": [round(q1, 4), round(q3, 4)],
                "rounds": len(bare), "bare_cpu_ms": round(statistics.median(bare) * 1e3, 3)}
    return rows


def meta() -> dict:
    import torch

    cpu = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model n")]
    return {"machine": f"{cpu[0].split(':', 1)[1].strip() if cpu else '?'} (1 thread)",
            "torch": torch.__version__, "date": datetime.date.today().isoformat()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help="write this run as the baseline")
    p.add_argument("--baseline", type=Path, default=BASELINE, help="default: %(default)s")
    p.add_argument("--rounds", type=int, default=30, help="at most, per shape")
    p.add_argument("--seconds", type=float, default=40.0,
                   help="rounds stop past this many seconds of timing (>= 3 rounds a shape)")
    args = p.parse_args()
    base = json.loads(args.baseline.read_text()) if args.baseline.exists() else None
    if base is None and not args.record:
        print(f"no baseline at {args.baseline}: run with --record first", file=sys.stderr)
        return 2
    t0, info = time.perf_counter(), meta()
    rows = measure(max(MIN_ROUNDS, args.rounds), args.seconds)
    print(f"{info['machine']}; torch {info['torch']}; {SEEDS} seeds, float32, "
          f"{time.perf_counter() - t0:.0f} s")
    tol = base.get("tolerance", DEFAULT_TOLERANCE) if base else DEFAULT_TOLERANCE
    print(f"{'row':<22}{'bare ms':>9}{'ratio':>8}{'IQR over rounds':>18}{'rounds':>7}"
          f"{'baseline':>10}{'limit':>8}")
    for key, r in rows.items():
        b = base["rows"].get(key) if base else None
        lim = f"{b['ratio']:>10.3f}{b['ratio'] * (1 + tol):>8.3f}" if b else f"{'-':>10}{'-':>8}"
        iqr = "{:.3f}-{:.3f}".format(*r["iqr"])
        print(f"{key:<22}{r['bare_cpu_ms']:>9.3f}{r['ratio']:>8.3f}{iqr:>18}{r['rounds']:>7}{lim}")
    if args.record:
        keep = {k: base[k] for k in ("tolerance", "tolerance_reason")
                if base and k in base}
        doc = {"about": "benchmarks/bench_regress.py: ratio of each mode's training step to the "
               "bare host's, per shape; a regression is ratio > ratio here * (1 + tolerance)",
               **info, "seeds": SEEDS, "dtype": "float32", "threads": 1, "reps": REPS,
               "tolerance": tol, **keep, "rows": rows}
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"recorded {args.baseline}")
        return 0
    if base.get("machine") != info["machine"] or base.get("torch") != info["torch"]:
        print(f"note: baseline from {base.get('machine')}, torch {base.get('torch')}, "
              f"{base.get('date')}")
    bad = compare({k: v["ratio"] for k, v in base["rows"].items()},
                  {k: v["ratio"] for k, v in rows.items()}, tol)
    print("\n".join(bad) if bad else f"no regression (tolerance {tol:g})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
