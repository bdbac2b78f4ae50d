"""Where a dormant layer's tracking step spends its host time (issue #12's dormant10 row at
1024 x 8192, where the CPU is the limit): each part's host wall time per call, the GPU drained
before every timed block, parts interleaved over rounds so the machine's drift hits them alike.

    python3 benchmarks/probe_tracking.py [--shape 1024x8192] [--seeds 1024] [--dtype bf16]
        [--calls 200] [--rounds 5] [--insitu N] [--cprofile N]

Rows (median over rounds of the mean per call, us): the host's forward; the layer's forward
with and without telemetry; the telemetry's `observe`, its launch alone and the host pass
alone (`column_stats`, the first of s13's two launches); the backward
after a bare, a dormant and a tracking forward; `layer.step()`; an empty `torch.no_grad()`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from bench_step import DTYPES, build_layer
from kasmina.kernels import triton_blend, triton_telemetry
from kasmina.kernels.launch import fast
from torch import nn


def timed(fn, calls: int) -> float:  # noqa: ANN001
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1024x8192")
    ap.add_argument("--seeds", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--insitu", type=int, default=0, metavar="N",
                    help="also N whole training steps a round per mode, each part timed")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also N tracking forwards under cProfile")
    args = ap.parse_args()
    hidden, rows = map(int, args.shape.split("x"))
    dtype, dev = DTYPES[args.dtype], "cuda"
    host = nn.Linear(hidden, hidden)
    layer = build_layer(host, args.seeds, 1, 1, ())[0].to(device=dev, dtype=dtype)
    host = host.to(device=dev, dtype=dtype)
    tel, cfg = layer.telemetry, layer.config
    x = torch.randn(rows, hidden, device=dev).to(dtype).requires_grad_()
    g = (torch.randn(rows, hidden, device=dev) / rows).to(dtype)
    h2 = host(x).detach()
    state = layer.__dict__
    hg, fresh = host(x), []
    n, f = h2.shape
    pass_args = (h2, h2, tel.columns, n, f, h2.stride(0), h2.stride(0), cfg.dead_threshold)
    pass_meta = {"TRACK": True, "COPY": False, "I64": False}

    def fwd(track: bool):  # noqa: ANN202
        def f() -> torch.Tensor:
            state["_tracking_step"] = track
            return layer(x)
        return f

    def backward_after(forward):  # noqa: ANN001, ANN202
        outs = []

        def prepare() -> None:
            outs.clear()
            outs.extend(forward() for _ in range(args.calls))
            torch.cuda.synchronize()

        def f() -> None:
            outs.pop().backward(g)
        return prepare, f

    parts = {
        "host forward": (None, lambda: host(x)),
        "layer forward, no telemetry": (None, fwd(False)),
        "layer forward, tracking": (None, fwd(True)),
        "seed_forward_eager, tracking": (None, lambda: layer._seed_forward_eager(
            hg, False, True)),
        "observe (no_grad)": (None, lambda: tel.observe(h2, cfg.dead_threshold, True)),
        "observe, a new h each call": (lambda: fresh.extend(
            host(x).detach() for _ in range(args.calls)), lambda: tel.observe(
            fresh.pop(), cfg.dead_threshold, True)),
        "column_stats into": (None, lambda: triton_blend.column_stats(
            h2, cfg.dead_threshold, into=tel.columns)),
        "triton_telemetry.observe (one launch)": (None, lambda: triton_telemetry.observe(
            h2, cfg.dead_threshold, tel.corr_idx, tel.corr_valid, tel.columns, tel.rows,
            tel.corr_sum, tel.corr_prod, tel.corr_n, tel.rows_sampled)),
        "backward after host": backward_after(lambda: host(x)),
        "backward after layer, no telemetry": backward_after(fwd(False)),
        "backward after layer, tracking": backward_after(fwd(True)),
        "layer.step()": (None, layer.step),
        "launcher key, column pass": (None, lambda: fast(triton_blend._host_pass_kernel).key(
            pass_args, pass_meta)),
        "torch.no_grad() enter/exit": (None, _no_grad),
    }
    for _, (prep, f) in parts.items():  # warm-up: compiles, autotunes
        for _ in range(3):
            if prep:
                prep()
            for _ in range(min(3, args.calls)):
                f()
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(args.rounds):
        for name, (prep, f) in parts.items():
            if prep:
                prep()
            times[name].append(timed(f, args.calls))
    if args.insitu:
        insitu(host, layer, x, g, args.insitu, args.rounds)
    if args.cprofile:
        prof = cProfile.Profile()
        f = fwd(True)
        prof.enable()
        for _ in range(args.cprofile):
            f()
        prof.disable()
        torch.cuda.synchronize()
        print(f"==== layer forward, tracking: cProfile, {args.cprofile} calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(24)
    print(f"{torch.cuda.get_device_name()} {args.shape} {args.dtype} seeds {args.seeds}: host us "
          f"a call, median of {args.rounds} rounds of {args.calls} calls (min, max)")
    for name, ts in times.items():
        print(f"  {name:<36} {statistics.median(ts):8.1f}  ({min(ts):.1f}, {max(ts):.1f})")


def insitu(host: nn.Module, layer: nn.Module, x: torch.Tensor, g: torch.Tensor, n: int,
           rounds: int) -> None:
    """bench_step's training step (zero_grad, forward, backward, SGD on the host, layer.step),
    each part's host time, the modes interleaved: the host alone, the dormant layer never
    tracking, tracking every 10th step, every step; with the GPU drained before each part
    (`sync`, the host's own time) and without (as bench_step runs)."""
    loss = torch.zeros((), device=x.device)
    state = layer.__dict__
    models = {"bare": (host, None), "never": (layer, 10**9), "every10": (layer, 10),
              "every1": (layer, 1)}
    opts = {name: torch.optim.SGD(m.host.parameters() if e else m.parameters(), lr=1e-3)
            for name, (m, e) in models.items()}
    parts = ("zero_grad", "forward", "backward", "host opt", "layer.step")

    def one_step(m: nn.Module, opt: torch.optim.Optimizer, seeded: nn.Module | None) -> list:
        marks, t = [], time.perf_counter()

        def mark() -> None:
            nonlocal t
            marks.append(time.perf_counter() - t)
            if sync:
                torch.cuda.synchronize()
            t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        mark()
        out = m(x)
        mark()
        out.backward(g)
        mark()
        opt.step()
        mark()
        if seeded:
            seeded.step(loss)
        mark()
        x.grad = None
        return marks

    for sync in (False, True):
        acc = {(name, p): [] for name in models for p in parts}
        for _ in range(rounds):
            for name, (m, every) in models.items():
                tot = [0.0] * len(parts)
                for i in range(n):
                    if every:
                        state["_tracking_step"] = i % every == 0
                    tot = [a + b for a, b in zip(tot, one_step(m, opts[name], every and layer),
                                                 strict=True)]
                for p, t in zip(parts, tot, strict=True):
                    acc[(name, p)].append(t / n * 1e6)
        torch.cuda.synchronize()
        print(f"in situ, host us a step ({'GPU drained before each part' if sync else 'no sync'}"
              f"), median of {rounds} rounds of {n} steps:")
        for name in models:
            row = "  ".join(f"{p} {statistics.median(acc[(name, p)]):6.1f}" for p in parts)
            total = sum(statistics.median(acc[(name, p)]) for p in parts)
            print(f"  {name:<8} {row}  total {total:6.1f}")


def _no_grad() -> None:
    with torch.no_grad():
        pass


if __name__ == "__main__":
    main()
