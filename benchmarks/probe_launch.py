"""Host time of one Triton launch, by route: the JIT (`kernel[grid](...)`), `kernels.launch`
(`fast(kernel)[grid](...)`), the compiled kernel's runner (`compiled[grid](*all_args)`) and
its C launcher called directly; for the telemetry's autotuned column pass also through the
autotuner. Tiny inputs, so the GPU keeps up and the host's time per launch is what is timed.
CUDA only.

    python3 benchmarks/probe_launch.py [--launches 3000]
"""

from __future__ import annotations

import argparse
import time

import torch
from kasmina.kernels import triton_blend as tb
from kasmina.kernels import triton_mlp as tm
from kasmina.kernels.launch import fast
from triton import knobs


def per_launch(fn, n: int) -> float:  # noqa: ANN001
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=3000)
    n = ap.parse_args().launches
    dev = "cuda"
    h = torch.randn(64, 64, device=dev).bfloat16()
    flat = torch.randn(1, 2 * 4 * 16 + 16 + 4, device=dev)
    part = torch.empty(1, 1, 3, device=dev)
    i32 = torch.zeros(2, dtype=torch.int32, device=dev) + 4
    f32, i64, u8 = (torch.zeros(1, device=dev), torch.zeros(1, dtype=torch.int64, device=dev),
                    torch.zeros(1, dtype=torch.uint8, device=dev))
    args = (h, h, h, flat, part, i32, f32, i64, f32, u8, 64, flat.shape[1], h.stride(0), 0)
    meta = dict(W=4, H=16, WP=4, BLOCK_N=64, SAVE=False, DIFF=False, I64=False, ALIGN=4,
                num_warps=1)
    k = tm._seed_fwd_kernel
    compiled = k[(1, 1)](*args, **meta)
    consts = [meta[a] for a in k.arg_names[len(args):]]
    runner = compiled[(1, 1, 1)]
    stream = torch.cuda.current_stream().cuda_stream
    print(f"host us a launch of _seed_fwd_kernel ({len(args)} arguments, {len(consts)} "
          f"constexprs), {n} launches:")
    print(f"  JIT kernel[grid](...)        {per_launch(lambda: k[(1, 1)](*args, **meta), n):6.1f}")
    print(f"  fast(kernel)[grid](...)      "
          f"{per_launch(lambda: fast(k)[(1, 1)](*args, **meta), n):6.1f}")
    print(f"  compiled[grid](*all_args)    {per_launch(lambda: runner(*args, *consts), n):6.1f}")
    run = compiled.run
    fn, md = compiled.function, compiled.packed_metadata
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    direct = lambda: run(1, 1, 1, stream, fn, md, None, *hooks, *args, *consts)  # noqa: E731
    print(f"  compiled.run (C launcher)    {per_launch(direct, n):6.1f}")
    bare = lambda: run(1, 1, 1, stream, fn, md, None, None, None, *args, *consts)  # noqa: E731
    print(f"  compiled.run, no hook chains {per_launch(bare, n):6.1f}")
    stats = torch.zeros(3, 64, dtype=torch.float64, device=dev)
    col = lambda: tb.column_stats(h, 1e-6, into=stats)  # noqa: E731
    print(f"  column_stats (autotuned, via fast)        {per_launch(col, n):6.1f}")
    auto = tb._host_pass_kernel
    grid = tb._grid(64, 64)
    tuned = lambda: auto[grid](h, h, stats, 64, 64, 64, 64, 1e-6, TRACK=True,  # noqa: E731
                               COPY=False, I64=False)
    print(f"  column_stats's kernel via the autotuner   {per_launch(tuned, n):6.1f}")
    e = torch.empty(1, device=dev)
    alloc = lambda: torch.empty(1, device=dev)  # noqa: E731
    print(f"  (torch.empty(1) on CUDA                   {per_launch(alloc, n):6.1f})")
    print(f"  (torch.add_ of a 1-element tensor         {per_launch(lambda: e.add_(1.0), n):6.1f})")


if __name__ == "__main__":
    main()
