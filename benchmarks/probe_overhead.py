"""Where the time of a small chunked step goes (1024 x 8192): the kernel on the GPU (CUDA
graph replay: no CPU in the loop) versus one eager call through the launcher and through the
torch.library op (CPU dispatch overhead included)."""

from __future__ import annotations

import argparse

import torch
import triton.testing
from kasmina.kernels import triton_blend


def main() -> None:
    h = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(102, 8192, 1, device="cuda")
    alpha = torch.full((102,), 0.5, device="cuda")
    run_of = torch.full((1024,), -1, dtype=torch.int32, device="cuda")
    run_of[torch.arange(0, 1020, 10)] = torch.arange(102, dtype=torch.int32, device="cuda")
    bounds = torch.stack([torch.arange(0, 1020, 10), torch.ones(102, dtype=torch.long)], 1).to(
        device="cuda", dtype=torch.int32)
    feat = torch.nonzero(run_of >= 0).flatten()
    calls = {
        "column_stats launcher": lambda: triton_blend.column_stats(h, 1e-6),
        "column_stats op": lambda: torch.ops.kasmina.column_stats(h, 1e-6),
        "chunk_blend launcher": lambda: triton_blend.chunk_blend(h, y, alpha, run_of, bounds, True,
                                                                 1e-6, 1),
        "chunk_blend op": lambda: torch.ops.kasmina.chunk_blend(h, y, alpha, feat, run_of, bounds,
                                                                True, 1e-6, 1),
    }
    for name, fn in calls.items():
        fn()
        eager = triton.testing.do_bench(fn, return_mode="median") * 1e3
        graph = triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3
        print(f"{name:<24} eager {eager:7.1f} us   CUDA graph (GPU time) {graph:7.1f} us")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    main()
