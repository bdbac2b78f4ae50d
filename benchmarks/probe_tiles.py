"""Tile-shape sweep for the Triton kernels on the big shape (4096 x 32768): achieved bandwidth
per (BLOCK_N, BLOCK_F, num_warps, row slabs per column tile), against the copy ceiling. Feeds
the autotune configs in kasmina/kernels/triton_blend.py."""

from __future__ import annotations

import itertools

import torch
import triton
import triton.testing

from kasmina.kernels import triton_blend

src = torch.empty(2**28, device="cuda")
dst = torch.empty_like(src)
ceiling = 2 * src.numel() * 4 / (triton.testing.do_bench(lambda: dst.copy_(src)) * 1e-3) / 1e9
del src, dst
print(f"{torch.cuda.get_device_name()} copy ceiling {ceiling:.0f} GB/s")
n, f = 32768, 4096
stats_k = triton_blend._column_stats_kernel.fn
blend_k = triton_blend._chunk_blend_kernel.fn
for dtype in (torch.bfloat16, torch.float32):
    h = torch.randn(n, f, device="cuda", dtype=dtype)
    out = torch.empty_like(h)
    stats = torch.zeros(3, f, device="cuda")
    active = torch.arange(0, 1024, 10)  # 10% of 1024 seeds of 4 features
    y = torch.randn(len(active), n, 4, device="cuda")
    alpha = torch.full((len(active),), 0.5, device="cuda")
    run_of = torch.full((f,), -1, dtype=torch.int32, device="cuda")
    pos_of = torch.arange(f, dtype=torch.int32, device="cuda") % 4
    for k, s in enumerate(active.tolist()):
        run_of[4 * s: 4 * s + 4] = k
    es = h.element_size()
    results = []
    for bn, bf, w, slabs in itertools.product((8, 16, 32, 64), (128, 256, 512), (4, 8),
                                              (32, 128, 100000)):
        if bn * bf > 16384:
            continue
        grid = (triton.cdiv(f, bf), max(1, min(triton.cdiv(n, bn), slabs)))
        meta = dict(BLOCK_N=bn, BLOCK_F=bf, SLABS_PER_TILE=slabs, num_warps=w)
        try:
            t_stats = triton.testing.do_bench(lambda: stats_k[grid](
                h, stats, n, f, h.stride(0), 1e-6, **meta), return_mode="median")
            t_blend = triton.testing.do_bench(lambda: blend_k[grid](
                h, y, out, stats, alpha, run_of, pos_of, n, f, 4, h.stride(0), out.stride(0),
                1e-6, TRACK=True, **meta), return_mode="median")
        except Exception as e:  # noqa: BLE001 (out of resources for a config: skip it)
            print(f"skip {meta}: {type(e).__name__}")
            continue
        bw_stats = n * f * es / (t_stats * 1e-3) / 1e9 / ceiling
        bw_blend = (2 * n * f * es + y.numel() * 4) / (t_blend * 1e-3) / 1e9 / ceiling
        results.append((bw_blend, bw_stats, bn, bf, w, slabs))
    results.sort(reverse=True)
    print(f"\n{dtype}: fraction of copy ceiling (blend+telemetry, stats only), best first")
    for bw_blend, bw_stats, bn, bf, w, slabs in results[:12]:
        print(f"  BLOCK_N {bn:>3} BLOCK_F {bf:>4} warps {w} slabs {slabs:>6}: "
              f"blend {bw_blend:.2f}  stats {bw_stats:.2f}")
    best_stats = max(results, key=lambda r: r[1])
    print(f"  best stats-only: {best_stats}")
