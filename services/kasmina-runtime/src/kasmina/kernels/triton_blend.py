"""Triton kernels for the chunked layer (Liger shape: private jit kernels, plain launchers).

One pass over the host output h (N, F): per column tile, every program walks a slab of rows,
writes the output (identity, or the alpha blend with the running seed's blueprint output) and
keeps (BLOCK_N, BLOCK_F) partial sums in registers (elementwise adds: no cross-thread reduction
inside the loop); at the end one reduction and one atomic per column per statistic. Accumulation
is float32 whatever h's dtype. Tile shapes are autotuned per (N, F) on the GPU; under
TRITON_INTERPRET=1 the first config runs on CPU tensors. The statistics buffer is restored
between autotuning runs (the atomics add into it), so the first call counts once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The best of a sweep on an H200 at 4096 x 32768 (benchmarks/probe_tiles.py, results in
# benchmarks/results/probe_tiles_h200_2026-11-27.log): small row blocks, 4 warps, 32-128 row
# slabs per column tile. Larger tiles (64 x 128, 8 warps) lost 20-40 % of bandwidth.
_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_F": bf, "SLABS_PER_TILE": sl}, num_warps=w)
            for bn, bf, w, sl in ((32, 128, 4, 32), (16, 128, 4, 32), (8, 128, 4, 32),
                                  (8, 256, 4, 32), (16, 256, 4, 32), (8, 256, 4, 128),
                                  (16, 128, 4, 128), (8, 128, 4, 128))]
if os.environ.get("TRITON_INTERPRET") == "1":
    _CONFIGS = _CONFIGS[:1]


@triton.autotune(configs=_CONFIGS, key=["N", "F"], restore_value=["stats_ptr"])
@triton.jit
def _column_stats_kernel(h_ptr, stats_ptr, N, F, stride_h, dead_threshold,
                         BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                         SLABS_PER_TILE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    rows_per_prog = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    row0 = tl.program_id(1) * rows_per_prog
    s = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    q = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    d = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    for r in range(0, rows_per_prog, BLOCK_N):
        rows = row0 + r + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & cmask[None, :]
        x = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :], mask=m,
                    other=0.0).to(tl.float32)
        s += x
        q += x * x
        d += ((tl.abs(x) < dead_threshold) & m).to(tl.float32)
    tl.atomic_add(stats_ptr + cols, tl.sum(s, axis=0), mask=cmask)
    tl.atomic_add(stats_ptr + F + cols, tl.sum(q, axis=0), mask=cmask)
    tl.atomic_add(stats_ptr + 2 * F + cols, tl.sum(d, axis=0), mask=cmask)


@triton.autotune(configs=_CONFIGS, key=["N", "F", "TRACK"], restore_value=["stats_ptr"])
@triton.jit
def _chunk_blend_kernel(h_ptr, y_ptr, out_ptr, stats_ptr, alpha_ptr, run_ptr, pos_ptr,
                        N, F, C, stride_h, stride_o, dead_threshold, TRACK: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                        SLABS_PER_TILE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    run = tl.load(run_ptr + cols, mask=cmask, other=-1)
    active = run >= 0
    a = tl.load(alpha_ptr + run, mask=cmask & active, other=0.0)  # (BLOCK_F,) float32
    blend = a != 0.0
    # y is (A, N, C): element (run, n, pos) at run * N * C + n * C + pos
    y_col = run.to(tl.int64) * N * C + tl.load(pos_ptr + cols, mask=cmask, other=0)
    rows_per_prog = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    row0 = tl.program_id(1) * rows_per_prog
    s = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    q = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    d = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    for r in range(0, rows_per_prog, BLOCK_N):
        rows = row0 + r + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & cmask[None, :]
        rows64 = rows[:, None].to(tl.int64)
        h = tl.load(h_ptr + rows64 * stride_h + cols[None, :], mask=m, other=0.0)
        x = h.to(tl.float32)
        yv = tl.load(y_ptr + y_col[None, :] + rows64 * C, mask=m & blend[None, :], other=0.0)
        o = tl.where(blend[None, :], (1.0 - a[None, :]) * x + a[None, :] * yv, x)
        tl.store(out_ptr + rows64 * stride_o + cols[None, :], o.to(h.dtype), mask=m)
        if TRACK:
            s += x
            q += x * x
            d += ((tl.abs(x) < dead_threshold) & m).to(tl.float32)
    if TRACK:
        tl.atomic_add(stats_ptr + cols, tl.sum(s, axis=0), mask=cmask)
        tl.atomic_add(stats_ptr + F + cols, tl.sum(q, axis=0), mask=cmask)
        tl.atomic_add(stats_ptr + 2 * F + cols, tl.sum(d, axis=0), mask=cmask)


def _grid(n: int, f: int):
    """Column tiles x row slabs. SLABS_PER_TILE row slabs per column tile, at most one per
    BLOCK_N rows: each column gets one atomic per slab, not per row block."""
    def grid(meta):
        slabs = max(1, min(triton.cdiv(n, meta["BLOCK_N"]), meta["SLABS_PER_TILE"]))
        return triton.cdiv(f, meta["BLOCK_F"]), slabs
    return grid


def column_stats(h: torch.Tensor, dead_threshold: float) -> torch.Tensor:
    assert h.dim() == 2 and h.stride(1) == 1, "h must be (N, F) with contiguous rows"
    n, f = h.shape
    stats = torch.zeros(3, f, dtype=torch.float32, device=h.device)
    _column_stats_kernel[_grid(n, f)](h, stats, n, f, h.stride(0), dead_threshold)
    return stats


def chunk_blend(h: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, run_of: torch.Tensor,
                pos_of: torch.Tensor, track: bool, dead_threshold: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    assert h.dim() == 2 and h.stride(1) == 1, "h must be (N, F) with contiguous rows"
    assert y.is_contiguous() and y.dtype == torch.float32 and alpha.dtype == torch.float32
    n, f = h.shape
    out = torch.empty_like(h)
    stats = torch.zeros(3 if track else 0, f, dtype=torch.float32, device=h.device)
    _chunk_blend_kernel[_grid(n, f)](h, y, out, stats, alpha, run_of, pos_of, n, f,
                                     y.shape[2], h.stride(0), out.stride(0), dead_threshold,
                                     TRACK=track)
    return out, stats
