"""Does a torch.compile in the same process slow our eager growing step? (#12: the growing
bar at 4096 x 32768 missed only in bench_step runs whose case also held the compile modes,
graft10's forward 460 us over bare's against 273-297 us in the other runs.)

Phases, in one process, at one shape: (a) eager bare and graft10 only; (b) torch.compile and
mode="reduce-overhead" copies of graft10 built and warmed up, then the eager modes again, the
compiled modules alive; (c) the compiled modules deleted (gc, empty_cache, dynamo reset), then
the eager modes again. Each phase: bench_step's interleaved blocks (step time, forward time,
ratio to bare) and one torch.profiler pass of graft10's step (its kernels by GPU time), so a
slowdown shows which kernel pays it.

    python3 benchmarks/probe_compile.py [--shape 4096x32768] [--seeds 1024] [--rounds 7]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch
from bench_step import DTYPES, S, build_layer, interleaved, make_modes, paired_ratio, train_step
from torch import nn
from torch.profiler import ProfilerActivity, profile


def timed(modes: dict, xs: list, gs: list, rounds: int, label: str) -> None:
    times = interleaved(modes, xs, gs, rounds, 10, xs[0].is_cuda)
    bare = times["bare"]
    for name, ts in times.items():
        fwd = statistics.median(t[1] for t in ts) - statistics.median(t[1] for t in bare)
        print(f"[{label}] {name:<11} step {statistics.median(t[0] for t in ts) * 1e3:8.3f} ms"
              f"  x{paired_ratio(times, name, 'bare'):.4f}  fwd over bare {fwd * 1e6:7.1f} us",
              flush=True)


def kernels(m, xs: list, gs: list, label: str, top: int) -> None:  # noqa: ANN001
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            train_step(m, xs[i % len(xs)], gs[i % len(gs)])
        if xs[0].is_cuda:
            torch.cuda.synchronize()
    print(f"[{label}] graft10 kernels, 5 steps:\n" + prof.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=top), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x32768")
    ap.add_argument("--seeds", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--device", default="cuda", help="cpu: a test of the script only")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("probe_compile.py needs a CUDA device (or --device cpu, a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    hidden, rows = map(int, args.shape.split("x"))
    dtype, n = DTYPES[args.dtype], max(1, round(0.1 * args.seeds))
    host = nn.Linear(hidden, hidden)
    tpl = {"host": host, "graft10": build_layer(host, args.seeds, n, 1, (S.TRAINING, S.GRAFTING))}
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(rows, hidden, device=dev, generator=gen).to(dtype).requires_grad_()
          for _ in range(2)]
    gs = [(torch.randn(rows, hidden, device=dev, generator=gen) / rows).to(dtype)
          for _ in range(2)]
    eager = make_modes(tpl, args.seeds, dtype, dev, {"bare", "graft10"})
    for m in eager.values():
        for i in range(11):
            train_step(m, xs[i % 2], gs[i % 2])
    timed(eager, xs, gs, args.rounds, "a: eager only")
    kernels(eager["graft10"], xs, gs, "a", args.top)
    compiled = make_modes(tpl, args.seeds, dtype, dev, {"compile", "compile_ro"})
    for m in compiled.values():
        for i in range(11):
            train_step(m, xs[i % 2], gs[i % 2])
    timed(eager, xs, gs, args.rounds, "b: compiled alive")
    timed(eager | compiled, xs, gs, args.rounds, "b: interleaved with them")
    kernels(eager["graft10"], xs, gs, "b", args.top)
    del compiled
    gc.collect()
    torch._dynamo.reset()
    if dev == "cuda":
        torch.cuda.empty_cache()
    timed(eager, xs, gs, args.rounds, "c: compiled gone")
    kernels(eager["graft10"], xs, gs, "c", args.top)


if __name__ == "__main__":
    main()
