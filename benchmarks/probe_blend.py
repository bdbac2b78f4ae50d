"""The two forms of the Triton blend (kasmina/kernels/triton_blend.py) side by side, at chunk
widths from 1 to 32: achieved bandwidth (bytes that must move / time, against the copy ceiling
measured in the same run) of

- gather:   one pass over h, y gathered through each column's running seed;
- two-pass: a vectorised copy+telemetry pass, then a blend pass over the running seeds only;
- ours:     what the launcher chooses (`triton_blend._two_pass`).

    python3 benchmarks/probe_blend.py
"""

from __future__ import annotations

import torch
import triton
import triton.testing
from bench_layer import copy_ceiling_gbs, make_case  # the same cases, one definition
from kasmina.kernels import reference, triton_blend

THR = 1e-6


def gather(h, y, alpha, run_of, bounds):
    n, f = h.shape
    out = torch.empty_like(h)
    stats = torch.zeros(3, f, dtype=torch.float32, device=h.device)
    triton_blend._gather_blend_kernel[triton_blend._grid(n, f)](
        h, y, out, stats, alpha, run_of, bounds, n, f, y.shape[2], h.stride(0), out.stride(0),
        THR, TRACK=True, I64=False)
    return out, stats


def two_pass(h, y, alpha, bounds, align):
    n, f = h.shape
    runs, _, c = y.shape
    out = torch.empty_like(h)
    stats = torch.zeros(3, f, dtype=torch.float32, device=h.device)
    triton_blend._host_pass_kernel[triton_blend._grid(n, f)](
        h, out, stats, n, f, h.stride(0), out.stride(0), THR, TRACK=True, COPY=True, I64=False)
    block_c = min(triton.next_power_of_2(c), 128)
    block_n = max(16, min(64, 4096 // block_c))
    triton_blend._seed_blend_kernel[(runs, min(triton.cdiv(n, block_n), triton_blend.MAX_GRID_Y))](
        h, y, out, alpha, bounds, n, c, h.stride(0), out.stride(0), ALIGN=align, I64=False,
        BLOCK_N=block_n, BLOCK_C=block_c)
    return out, stats


def case(hidden, rows, seeds, frac, dtype):
    _, _, h, y, alpha, (feat, run_of, bounds, align) = make_case(hidden, rows, seeds, frac, dtype)
    return h, y, alpha, run_of, bounds, align, feat


def main() -> None:
    ceiling = copy_ceiling_gbs()
    print(f"{torch.cuda.get_device_name()}  copy ceiling {ceiling:.0f} GB/s; "
          "fraction of it (time in us)")
    print(f"{'dtype':<6}{'hidden x rows':>16}{'seeds':>6}{'C':>4}{'active':>7}{'floor MB':>9}"
          f"{'gather':>16}{'two-pass':>16}{'ours':>16}")
    shapes = ((4096, 32768, 1024), (4096, 32768, 512), (4096, 32768, 256), (4096, 32768, 128),
              (1024, 8192, 1024), (1024, 8192, 64))
    for dtype in (torch.bfloat16, torch.float32):
        for hidden, rows, seeds in shapes:
            for frac in (0.1, 1.0):
                h, y, alpha, run_of, bounds, align, feat = case(hidden, rows, seeds, frac, dtype)
                ref = reference.chunk_blend(h, y, alpha, run_of, bounds)
                args = (h, y, alpha, run_of, bounds, align)
                calls = {"gather": lambda a=args: gather(*a[:5]),
                         "two-pass": lambda a=args: two_pass(*a[:3], *a[4:]),
                         "ours": lambda a=args: triton_blend.chunk_blend(*a[:5], True, THR,
                                                                         a[5])}
                moved = 2 * h.numel() * h.element_size() + feat.numel() * rows * 4
                row = (f"{str(dtype).split('.')[-1]:<6}{f'{hidden} x {rows}':>16}{seeds:>6}"
                       f"{y.shape[2]:>4}{frac:>7.0%}{moved / 1e6:>9.0f}")
                for fn in calls.values():
                    torch.testing.assert_close(fn()[0].float(), ref.float(), rtol=1e-2,
                                               atol=1e-2)
                    ms = triton.testing.do_bench(fn, return_mode="median")
                    row += f"{moved / (ms * 1e-3) / 1e9 / ceiling:>9.2f} ({ms * 1e3:4.0f})"
                print(row, flush=True)


def profile_once() -> None:
    """One launch of each kernel, between cudaProfilerStart/Stop, for
    `ncu --profile-from-start off` (autotuning happens before the window)."""
    h, y, alpha, run_of, bounds, align, _ = case(4096, 32768, 128, 0.1, torch.bfloat16)
    for _ in range(2):
        gather(h, y, alpha, run_of, bounds)
        two_pass(h, y, alpha, bounds, align)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    gather(h, y, alpha, run_of, bounds)
    two_pass(h, y, alpha, bounds, align)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ncu", action="store_true", help="one profiled pass (for Nsight Compute)")
    profile_once() if ap.parse_args().ncu else main()
