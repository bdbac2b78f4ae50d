"""Triton kernels for the chunked layer (Liger shape: private jit kernels, plain launchers).

One pass over the host output h (N, F): per column tile, every program walks a slab of rows,
writes the output (identity, or the alpha blend with the running seed's blueprint output) and
keeps per-column sums in registers; at the end one atomic per column per statistic. Accumulation
is float32 whatever h's dtype. Under TRITON_INTERPRET=1 the same kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32
BLOCK_F = 128


@triton.jit
def _column_stats_kernel(h_ptr, stats_ptr, N, F, stride_h, rows_per_prog, dead_threshold,
                         BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    row0 = tl.program_id(1) * rows_per_prog
    s = tl.zeros([BLOCK_F], dtype=tl.float32)
    q = tl.zeros([BLOCK_F], dtype=tl.float32)
    d = tl.zeros([BLOCK_F], dtype=tl.float32)
    for r in range(0, rows_per_prog, BLOCK_N):
        rows = row0 + r + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & cmask[None, :]
        x = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :], mask=m,
                    other=0.0).to(tl.float32)
        s += tl.sum(x, axis=0)
        q += tl.sum(x * x, axis=0)
        d += tl.sum(((tl.abs(x) < dead_threshold) & m).to(tl.float32), axis=0)
    tl.atomic_add(stats_ptr + cols, s, mask=cmask)
    tl.atomic_add(stats_ptr + F + cols, q, mask=cmask)
    tl.atomic_add(stats_ptr + 2 * F + cols, d, mask=cmask)


@triton.jit
def _chunk_blend_kernel(h_ptr, y_ptr, out_ptr, stats_ptr, alpha_ptr, run_ptr, pos_ptr,
                        N, F, C, stride_h, stride_o, rows_per_prog, dead_threshold,
                        TRACK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    run = tl.load(run_ptr + cols, mask=cmask, other=-1)
    active = run >= 0
    a = tl.load(alpha_ptr + run, mask=cmask & active, other=0.0)  # (BLOCK_F,) float32
    blend = a != 0.0
    # y is (A, N, C): element (run, n, pos) at run * N * C + n * C + pos
    y_col = run.to(tl.int64) * N * C + tl.load(pos_ptr + cols, mask=cmask, other=0)
    row0 = tl.program_id(1) * rows_per_prog
    s = tl.zeros([BLOCK_F], dtype=tl.float32)
    q = tl.zeros([BLOCK_F], dtype=tl.float32)
    d = tl.zeros([BLOCK_F], dtype=tl.float32)
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
            s += tl.sum(x, axis=0)
            q += tl.sum(x * x, axis=0)
            d += tl.sum(((tl.abs(x) < dead_threshold) & m).to(tl.float32), axis=0)
    if TRACK:
        tl.atomic_add(stats_ptr + cols, s, mask=cmask)
        tl.atomic_add(stats_ptr + F + cols, q, mask=cmask)
        tl.atomic_add(stats_ptr + 2 * F + cols, d, mask=cmask)


def _grid(n: int, f: int, device: torch.device) -> tuple[tuple[int, int], int]:
    """Column tiles x row slabs: enough programs to fill the GPU (4 per SM), each slab a
    multiple of BLOCK_N rows, so each column gets one atomic per slab, not per row block."""
    col_tiles = triton.cdiv(f, BLOCK_F)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: few programs
        target = col_tiles
    slabs = max(1, min(triton.cdiv(n, BLOCK_N), triton.cdiv(target, col_tiles)))
    rows_per_prog = triton.cdiv(triton.cdiv(n, slabs), BLOCK_N) * BLOCK_N
    return (col_tiles, triton.cdiv(n, rows_per_prog)), rows_per_prog


def column_stats(h: torch.Tensor, dead_threshold: float) -> torch.Tensor:
    assert h.dim() == 2 and h.stride(1) == 1, "h must be (N, F) with contiguous rows"
    n, f = h.shape
    stats = torch.zeros(3, f, dtype=torch.float32, device=h.device)
    grid, rows_per_prog = _grid(n, f, h.device)
    _column_stats_kernel[grid](h, stats, n, f, h.stride(0), rows_per_prog, dead_threshold,
                               BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    return stats


def chunk_blend(h: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, run_of: torch.Tensor,
                pos_of: torch.Tensor, track: bool, dead_threshold: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    assert h.dim() == 2 and h.stride(1) == 1, "h must be (N, F) with contiguous rows"
    assert y.is_contiguous() and y.dtype == torch.float32 and alpha.dtype == torch.float32
    n, f = h.shape
    out = torch.empty_like(h)
    stats = torch.zeros(3 if track else 0, f, dtype=torch.float32, device=h.device)
    grid, rows_per_prog = _grid(n, f, h.device)
    _chunk_blend_kernel[grid](h, y, out, stats, alpha, run_of, pos_of, n, f, y.shape[2],
                              h.stride(0), out.stride(0), rows_per_prog, dead_threshold,
                              TRACK=track, BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F)
    return out, stats
