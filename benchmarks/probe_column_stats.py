"""The telemetry's read-only pass over the host output (`triton_blend.column_stats` into the
float64 accumulators, as `SeedTelemetry.observe` calls it) over tile shapes, warps and row
slabs, against the autotuned choice; each checked first against torch. CUDA only.

    python3 benchmarks/probe_column_stats.py [--shapes 4096x32768,1024x8192]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from kasmina.kernels import triton_blend as tb
from probe_seed_kernels import timed


def sweep(f: int, n: int) -> None:
    h = torch.randn(n, f, device="cuda").bfloat16()
    x = h.double()
    want = torch.stack([x.sum(0), x.square().sum(0), (x.abs() < 1e-6).double().sum(0)])
    acc = torch.zeros(3, f, dtype=torch.float64, device="cuda")
    tb.column_stats(h, 1e-6, into=acc)  # autotunes once for this key
    torch.testing.assert_close(acc, want, rtol=1e-4, atol=1e-2)
    gb = n * f * h.element_size() / 1e3  # bytes / us -> GB/s
    us = timed(lambda: tb.column_stats(h, 1e-6, into=acc))
    best = tb._host_pass_kernel.best_config
    print(f"{f}x{n} bf16: autotuned {best}: {us:7.1f} us {gb / us:6.0f} GB/s", flush=True)
    rows = []
    for bn, bf, w, sl in itertools.product((8, 16, 32), (128, 256, 512), (4, 8), (32, 128, 512)):
        grid = (triton.cdiv(f, bf), max(1, min(triton.cdiv(n, bn), sl)))

        def run(bn=bn, bf=bf, w=w, sl=sl, grid=grid) -> None:  # noqa: ANN001
            tb._host_pass_kernel.fn[grid](h, h, acc, n, f, h.stride(0), h.stride(0), 1e-6,
                                          TRACK=True, COPY=False, I64=False, BLOCK_N=bn,
                                          BLOCK_F=bf, SLABS_PER_TILE=sl, num_warps=w)
        acc.zero_()
        run()
        torch.testing.assert_close(acc, want, rtol=1e-4, atol=1e-2)
        rows.append((timed(run), bn, bf, w, sl))
    for us, bn, bf, w, sl in sorted(rows)[:12]:
        print(f"  rows {bn:3d} features {bf:4d} warps {w} slabs {sl:4d}: {us:7.1f} us "
              f"{gb / us:6.0f} GB/s (checked)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x32768,1024x8192")
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        sweep(*map(int, shape.split("x")))


if __name__ == "__main__":
    main()
