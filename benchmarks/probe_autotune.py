"""What a new row count costs the first time: the layer's autotuned Triton kernels key their
tuning on their sizes, so a batch of rows not seen before (dynamic padding, a last partial
batch, variable sequence lengths) may be tuned anew on its first call. Times, on the GPU, the
first and a later call of a dormant layer's tracking forward and of a growing layer's training
step at a sequence of row counts, each count new to the process.

    python3 benchmarks/probe_autotune.py [--features 1024] [--seeds 1024] [--dtype bf16]
        [--rows 8192,8191,8000,4096,4100]

Prints, per mode and row count, the first call's wall time and the median of 5 later calls
(ms, the GPU drained around each), and the autotuners' cache sizes at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_step import DTYPES, S, build_layer
from torch import nn


def wall(fn) -> float:  # noqa: ANN001
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--rows", default="8192,8191,8000,4096,4100")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (the kernels' autotuners run there only)")
    dtype, f = DTYPES[args.dtype], args.features
    n = max(1, round(0.1 * args.seeds))
    host = nn.Linear(f, f)
    layers = {"dormant": build_layer(host, args.seeds, n, 1, ())[0],
              "graft10": build_layer(host, args.seeds, n, 1, (S.TRAINING, S.GRAFTING))[0]}
    loss = torch.zeros((), device="cuda")
    print(f"{torch.cuda.get_device_name()} {f} features, {args.seeds} seeds, {args.dtype}")
    for name, layer in layers.items():
        layer = layer.to("cuda", dtype).train()
        layer.set_cuda_graphs(False)  # (a graph is captured per shape anyway)

        def step(x: torch.Tensor, layer=layer) -> None:  # noqa: ANN001
            layer(x).float().square().mean().backward()
            layer.step(loss)
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, f, device="cuda").to(dtype).requires_grad_()
            first = wall(lambda x=x: step(x))
            later = statistics.median(wall(lambda x=x: step(x)) for _ in range(5))
            print(f"  {name:<8} rows {rows:>6}: first call {first:9.1f} ms, later {later:7.2f} ms",
                  flush=True)
    from kasmina.kernels import triton_blend, triton_telemetry
    for k in (triton_blend._host_pass_kernel, triton_blend._gather_blend_kernel,
              triton_telemetry._observe_kernel):
        print(f"  {k.fn.__name__}: {len(getattr(k, 'cache', {}))} tuned keys")


if __name__ == "__main__":
    main()
