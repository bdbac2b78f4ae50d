"""Where a training step's GPU and host time go, per op and kernel (torch.profiler), for the
modes of bench_step.py at one shape: the evidence behind each step-speed change.

    python3 benchmarks/probe_step.py [--shape 4096x32768] [--seeds 1024] [--dtype bf16]
        [--modes dormant,graft10,training,graft10_g] [--steps 5] [--sort self_cpu_time_total]
        [--cprofile 200] [--split 300]

--cprofile N: instead of torch.profiler, N steps a mode under cProfile (the host's Python time
per function, by own time), for shapes where the CPU is the limit.
--split N: the host's wall time of each part of a step (zero_grad, forward, backward, the host
optimizer, layer.step), mean over N steps, no synchronisation inside (the GPU keeps up where
the CPU is the limit, so this is where the step's time goes there).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from bench_step import DTYPES, S, base, build_layer, train_step
from torch import nn
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x32768")
    ap.add_argument("--seeds", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--modes", default="bare,dormant,graft10,training")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--cprofile", type=int, default=0, metavar="N")
    ap.add_argument("--split", type=int, default=0, metavar="N")
    ap.add_argument("--sort", default="self_cuda_time_total",
                    help="a key_averages column, e.g. self_cpu_time_total (host-bound shapes)")
    args = ap.parse_args()
    hidden, rows = map(int, args.shape.split("x"))
    dtype, dev = DTYPES[args.dtype], "cuda"
    n = max(1, round(0.1 * args.seeds))
    stages = {"dormant": (n, 1, ()), "dormant10": (n, 10, ()), "training": (n, 1, (S.TRAINING,)),
              "graft10": (n, 1, (S.TRAINING, S.GRAFTING))}
    host = nn.Linear(hidden, hidden)
    x = torch.randn(rows, hidden, device=dev).to(dtype).requires_grad_()
    g = (torch.randn(rows, hidden, device=dev) / rows).to(dtype)
    loss = torch.zeros((), device=dev)
    for name in args.modes.split(","):
        if name == "bare":
            model = host.to(device=dev, dtype=dtype)
            after = lambda: None  # noqa: E731
        else:
            model = build_layer(host.cpu().float(), args.seeds,
                                *stages[base(name)])[0]
            model = model.to(device=dev, dtype=dtype)
            if name.endswith(("_g", "_e")):  # bench_step's graphed and eager modes
                model.set_cuda_graphs(name.endswith("_g"))
            if name.endswith("_gp"):  # and its general-path ones
                model.host.register_forward_hook(lambda *_: None)
            after = lambda model=model: model.step(loss)  # noqa: E731
        opt = torch.optim.SGD((model.host if name != "bare" else model).parameters(), lr=1e-3)
        mode = type("M", (), {"model": model, "opts": [opt], "after": after})
        for _ in range(8):
            train_step(mode, x, g)
        torch.cuda.synchronize()
        if args.split:
            split(f"{args.shape} {name}", mode, x, g, args.split)
            continue
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.cprofile):
                train_step(mode, x, g)
            prof.disable()
            torch.cuda.synchronize()
            print(f"==== {name} {args.shape} {args.dtype} seeds {args.seeds}: cProfile, "
                  f"{args.cprofile} steps")
            for key in ("tottime", "cumulative"):
                pstats.Stats(prof).sort_stats(key).print_stats(args.top)
            continue
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                train_step(mode, x, g)
            torch.cuda.synchronize()
        print(f"==== {name} {args.shape} {args.dtype} seeds {args.seeds}: per {args.steps} steps")
        print(prof.key_averages().table(sort_by=args.sort, row_limit=args.top,
                                        max_name_column_width=60))


def split(name: str, m: object, x: torch.Tensor, g: torch.Tensor, n: int) -> None:
    """bench_step.train_step's parts, each timed on the host."""
    parts = ["zero_grad", "forward", "backward", "host opt", "layer.step"]
    tot = [0.0] * len(parts)
    for _ in range(n):
        t0 = time.perf_counter()
        for opt in m.opts:
            opt.zero_grad(set_to_none=True)
        x.grad = None
        t1 = time.perf_counter()
        out = m.model(x)
        t2 = time.perf_counter()
        out.backward(g)
        t3 = time.perf_counter()
        for opt in m.opts:
            opt.step()
        t4 = time.perf_counter()
        m.after()
        t5 = time.perf_counter()
        for i, (a, b) in enumerate(zip((t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True)):
            tot[i] += b - a
    torch.cuda.synchronize()
    row = "  ".join(f"{p} {t / n * 1e6:7.1f}" for p, t in zip(parts, tot, strict=True))
    print(f"split {name:<20} host us a step: {row}  total {sum(tot) / n * 1e6:7.1f}")


if __name__ == "__main__":
    main()
