"""Triton kernels for the chunked layer (Liger shape: private jit kernels, plain launchers).

`_host_pass_kernel`, over the host output h (N, F): per column tile, every program walks a slab
of rows, optionally copies h to the output, and keeps (BLOCK_N, BLOCK_F) partial sums in
registers (elementwise adds: no cross-thread reduction inside the loop); at the end one
reduction and one atomic per column per statistic. Accumulation is float32 whatever h's dtype.
Without the copy it is the telemetry of a layer with no running seed.

The blend of running seeds' outputs y (A, N, C) into h has two forms, chosen by `_two_pass`
from the chunk width C, the running fraction and the size (measured on an H200,
benchmarks/NOTES.md, "Fused Triton kernels", versions 4 and 5):
- wide chunks: two passes with affine addresses, so every load and store is a full
  vector: the host pass with the copy, then `_seed_blend_kernel`, one program per (running
  seed, row block), which overwrites the seed's chunk with the alpha blend; seeds whose alpha
  is 0 return at once, so their chunks stay the copied h bit for bit. `align` (a power of two
  dividing every running chunk's start and width) is declared to the compiler.
- narrow chunks and small activations: one pass, `_gather_blend_kernel`: the host pass
  reading y through each column's running seed. Its y loads are gathers (scalar; 255
  registers, 12 % occupancy in Nsight Compute), but for chunks of a few features the
  two-pass form reads and writes whole 32-byte sectors for a few useful bytes and loses
  (C = 4: 0.34 vs 0.39 of the copy ceiling at 10 % active, 0.29 vs 0.62 at 100 %).

Tile shapes of the column passes are autotuned per (N, F) on the GPU; under TRITON_INTERPRET=1
the first config runs on CPU tensors. The statistics buffer is restored between autotuning runs
(the atomics add into it), so the first call counts once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import cdiv, fast, pow2

# The best of a sweep on an H200 at 4096 x 32768 (benchmarks/probe_tiles.py, results in
# benchmarks/results/probe_tiles_h200_2026-11-27.log): small row blocks, 4 warps, 32-128 row
# slabs per column tile. Larger tiles (64 x 128, 8 warps) lost 20-40 % of bandwidth.
COLUMN_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_F": bf, "SLABS_PER_TILE": sl},
                                num_warps=w)
                  for bn, bf, w, sl in ((32, 128, 4, 32), (16, 128, 4, 32), (8, 128, 4, 32),
                                        (8, 256, 4, 32), (16, 256, 4, 32), (8, 256, 4, 128),
                                        (16, 128, 4, 128), (8, 128, 4, 128))]
if os.environ.get("TRITON_INTERPRET") == "1":
    COLUMN_CONFIGS = COLUMN_CONFIGS[:1]


@triton.jit
def _row_offsets(rows, I64: tl.constexpr):
    """rows as a (BLOCK_N, 1) column of element-offset multipliers, int64 only when needed."""
    r = rows[:, None]
    if I64:
        r = r.to(tl.int64)
    return r


@triton.jit
def _running_columns(cols, cmask, run_ptr, alpha_ptr, bounds_ptr, N, C, I64: tl.constexpr):
    """Per column of a tile: whether its seed runs, that seed's alpha (0 if none), and the
    column's offset in y (A, N, C) at row 0: element (run, n, pos) is at run*N*C + n*C + pos."""
    run = tl.load(run_ptr + cols, mask=cmask, other=-1)
    active = cmask & (run >= 0)
    a = tl.load(alpha_ptr + run, mask=active, other=0.0)
    start = tl.load(bounds_ptr + 2 * run, mask=active, other=0)
    if I64:
        run = run.to(tl.int64)
    return active, a, run * N * C + (cols - start)


@triton.autotune(configs=COLUMN_CONFIGS, key=["N", "F", "TRACK", "COPY", "I64"],
                 restore_value=["stats_ptr"])
@triton.jit
def _host_pass_kernel(h_ptr, out_ptr, stats_ptr, N, F, stride_h, stride_o, dead_threshold,
                      TRACK: tl.constexpr, COPY: tl.constexpr, I64: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                      SLABS_PER_TILE: tl.constexpr):
    column_slab(h_ptr, out_ptr, stats_ptr, N, F, stride_h, stride_o, dead_threshold,
                tl.program_id(0), tl.program_id(1), tl.num_programs(1), TRACK, COPY, I64,
                BLOCK_N, BLOCK_F)


@triton.jit
def column_slab(h_ptr, out_ptr, stats_ptr, N, F, stride_h, stride_o, dead_threshold, tile, slab,
                slabs, TRACK: tl.constexpr, COPY: tl.constexpr, I64: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    """The host pass over column tile `tile`, row slab `slab` of `slabs` (also the dormant
    telemetry's, `triton_telemetry._observe_kernel`)."""
    cols = tile * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    rows_per_prog = tl.cdiv(tl.cdiv(N, slabs), BLOCK_N) * BLOCK_N
    row0 = slab * rows_per_prog
    s = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    q = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    d = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    for r in range(0, rows_per_prog, BLOCK_N):
        rows = row0 + r + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & cmask[None, :]
        rows_i = _row_offsets(rows, I64)
        h = tl.load(h_ptr + rows_i * stride_h + cols[None, :], mask=m, other=0.0)
        if COPY:
            tl.store(out_ptr + rows_i * stride_o + cols[None, :], h, mask=m)
        if TRACK:
            x = h.to(tl.float32)
            s += x
            q += x * x
            d += ((tl.abs(x) < dead_threshold) & m).to(tl.float32)
    if TRACK:  # float32 partial sums, added in the statistics' dtype (float64 accumulators)
        acc = stats_ptr.dtype.element_ty
        tl.atomic_add(stats_ptr + cols, tl.sum(s, axis=0).to(acc), mask=cmask)
        tl.atomic_add(stats_ptr + F + cols, tl.sum(q, axis=0).to(acc), mask=cmask)
        tl.atomic_add(stats_ptr + 2 * F + cols, tl.sum(d, axis=0).to(acc), mask=cmask)


@triton.autotune(configs=COLUMN_CONFIGS, key=["N", "F", "TRACK", "I64"],
                 restore_value=["stats_ptr"])
@triton.jit
def _gather_blend_kernel(h_ptr, y_ptr, out_ptr, stats_ptr, alpha_ptr, run_ptr, bounds_ptr,
                         N, F, C, stride_h, stride_o, dead_threshold, TRACK: tl.constexpr,
                         I64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                         SLABS_PER_TILE: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    _, a, y_col = _running_columns(cols, cmask, run_ptr, alpha_ptr, bounds_ptr, N, C, I64)
    blend = a != 0.0
    rows_per_prog = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    row0 = tl.program_id(1) * rows_per_prog
    s = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    q = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    d = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
    for r in range(0, rows_per_prog, BLOCK_N):
        rows = row0 + r + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & cmask[None, :]
        rows_i = _row_offsets(rows, I64)
        h = tl.load(h_ptr + rows_i * stride_h + cols[None, :], mask=m, other=0.0)
        x = h.to(tl.float32)
        yv = tl.load(y_ptr + (y_col[None, :] + rows_i * C), mask=m & blend[None, :], other=0.0)
        o = tl.where(blend[None, :], (1.0 - a[None, :]) * x + a[None, :] * yv, x)
        tl.store(out_ptr + rows_i * stride_o + cols[None, :], o.to(h.dtype), mask=m)
        if TRACK:
            s += x
            q += x * x
            d += ((tl.abs(x) < dead_threshold) & m).to(tl.float32)
    if TRACK:
        tl.atomic_add(stats_ptr + cols, tl.sum(s, axis=0), mask=cmask)
        tl.atomic_add(stats_ptr + F + cols, tl.sum(q, axis=0), mask=cmask)
        tl.atomic_add(stats_ptr + 2 * F + cols, tl.sum(d, axis=0), mask=cmask)


@triton.autotune(configs=COLUMN_CONFIGS, key=["N", "F", "I64"])
@triton.jit
def _blend_backward_kernel(g_ptr, gh_ptr, gy_ptr, alpha_ptr, run_ptr, bounds_ptr, N, F, C,
                           stride_g, stride_gh, I64: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_F: tl.constexpr, SLABS_PER_TILE: tl.constexpr):
    """The gather blend's backward: grad_h = g * (1 - alpha) on running columns, g elsewhere;
    grad_y[run, n, pos] = g * alpha, scattered like the forward's y gather."""
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    active, a, y_col = _running_columns(cols, cmask, run_ptr, alpha_ptr, bounds_ptr, N, C, I64)
    rows_per_prog = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BLOCK_N) * BLOCK_N
    row0 = tl.program_id(1) * rows_per_prog
    for r in range(0, rows_per_prog, BLOCK_N):
        rows = row0 + r + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & cmask[None, :]
        rows_i = _row_offsets(rows, I64)
        g = tl.load(g_ptr + rows_i * stride_g + cols[None, :], mask=m, other=0.0)
        gf = g.to(tl.float32)
        gh = tl.where(active[None, :], gf * (1.0 - a[None, :]), gf)
        tl.store(gh_ptr + rows_i * stride_gh + cols[None, :], gh.to(g.dtype), mask=m)
        tl.store(gy_ptr + (y_col[None, :] + rows_i * C), gf * a[None, :],
                 mask=m & active[None, :])


@triton.jit
def _seed_blend_kernel(h_ptr, y_ptr, out_ptr, alpha_ptr, bounds_ptr, N, C, stride_h, stride_o,
                       ALIGN: tl.constexpr, I64: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    # Seeds on axis 0: neighbouring programs blend neighbouring chunks of the same rows (row
    # blocks first was 10-25 % slower at 100 % active, probe_blend_h200_2026-11-27_axis0.log).
    # Axis 1 allows 65,535 programs: each strides over the row blocks.
    run = tl.program_id(0)
    a = tl.load(alpha_ptr + run)
    if a != 0.0:
        start = tl.multiple_of(tl.load(bounds_ptr + 2 * run), ALIGN)
        width = tl.multiple_of(tl.load(bounds_ptr + 2 * run + 1), ALIGN)
        run_i = run
        if I64:
            run_i = run.to(tl.int64)
        for block in range(tl.program_id(1), tl.cdiv(N, BLOCK_N), tl.num_programs(1)):
            rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
            rows_i = _row_offsets(rows, I64)
            y_rows = y_ptr + (run_i * N * C + rows_i * C)  # y is (A, N, C)
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                m = (rows[:, None] < N) & (cs[None, :] < width)
                h = tl.load(h_ptr + rows_i * stride_h + start + cs[None, :], mask=m, other=0.0)
                yv = tl.load(y_rows + cs[None, :], mask=m, other=0.0)
                o = (1.0 - a) * h.to(tl.float32) + a * yv
                tl.store(out_ptr + rows_i * stride_o + start + cs[None, :], o.to(h.dtype),
                         mask=m)


def _grid(n: int, f: int):
    """Column tiles x row slabs. SLABS_PER_TILE row slabs per column tile, at most one per
    BLOCK_N rows: each column gets one atomic per slab, not per row block."""
    def grid(meta):
        slabs = max(1, min(cdiv(n, meta["BLOCK_N"]), meta["SLABS_PER_TILE"]))
        return cdiv(f, meta["BLOCK_F"]), slabs
    return grid


def needs_i64(h: torch.Tensor, y: torch.Tensor | None = None) -> bool:
    """Whether an element offset into h (rows of stride h.stride(0)), the contiguous (N, F)
    output or y may not fit in int32; int32 offsets need fewer registers
    (benchmarks/NOTES.md, Fused Triton kernels)."""
    extent = max(h.shape[0] * max(h.stride(0), h.shape[1]), 0 if y is None else y.numel())
    return extent >= 2**31 - 1


def column_stats(h: torch.Tensor, dead_threshold: float,
                 into: torch.Tensor | None = None) -> torch.Tensor:
    """(3, F) float32 sums, squares and dead counts of h's columns; with `into` (a contiguous
    (3, F) accumulator, float64 for the telemetry's), added into it instead (no allocation,
    no zeroing launch) and returned."""
    assert h.dim() == 2 and h.stride(1) == 1, "h must be (N, F) with contiguous rows"
    n, f = h.shape
    stats = torch.zeros(3, f, dtype=torch.float32, device=h.device) if into is None else into
    assert stats.shape == (3, f) and stats.is_contiguous()
    fast(_host_pass_kernel)[_grid(n, f)](h, h, stats, n, f, h.stride(0), h.stride(0),
                                         dead_threshold, TRACK=True, COPY=False,
                                         I64=needs_i64(h))
    return stats


# When the two-pass blend wins (H200 probe, benchmarks/NOTES.md, Fused Triton kernels): from
# 16-feature chunks, or 8 with at most a quarter of the features running; never below 32 MiB
# of activations, where the second launch costs more than the pass saves.
WIDE_CHUNK = 16
MIN_TWO_PASS_BYTES = 2**25
MAX_GRID_Y = 65_535  # CUDA's limit on grid axis 1


def _two_pass(h: torch.Tensor, runs: int, c: int) -> bool:
    if h.numel() * h.element_size() < MIN_TWO_PASS_BYTES:
        return False
    return c >= WIDE_CHUNK or (c >= WIDE_CHUNK // 2 and 4 * runs * c <= h.shape[1])


def chunk_blend(h: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, run_of: torch.Tensor,
                bounds: torch.Tensor, track: bool, dead_threshold: float, align: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    assert h.dim() == 2 and h.stride(1) == 1, "h must be (N, F) with contiguous rows"
    assert y.is_contiguous() and y.dtype == torch.float32 and alpha.dtype == torch.float32
    n, f = h.shape
    runs, _, c = y.shape
    out = torch.empty_like(h)
    stats = torch.zeros(3 if track else 0, f, dtype=torch.float32, device=h.device)
    i64 = needs_i64(h, y)
    if not _two_pass(h, runs, c):
        fast(_gather_blend_kernel)[_grid(n, f)](
            h, y, out, stats, alpha, run_of, bounds, n, f, c, h.stride(0), out.stride(0),
            dead_threshold, TRACK=track, I64=i64)
        return out, stats
    fast(_host_pass_kernel)[_grid(n, f)](h, out, stats, n, f, h.stride(0), out.stride(0),
                                         dead_threshold, TRACK=track, COPY=True, I64=i64)
    if runs:
        block_c = min(pow2(c), 128)
        block_n = max(16, min(64, 4096 // block_c))  # at C = 32, 16-256 rows tied (v4 sweep)
        fast(_seed_blend_kernel)[(runs, min(cdiv(n, block_n), MAX_GRID_Y))](
            h, y, out, alpha, bounds, n, c, h.stride(0), out.stride(0), ALIGN=align, I64=i64,
            BLOCK_N=block_n, BLOCK_C=block_c)
    return out, stats


def chunk_blend_backward(grad_out: torch.Tensor, alpha: torch.Tensor, run_of: torch.Tensor,
                         bounds: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_h, grad_y) of chunk_blend, in one pass over the gradient (either blend form)."""
    g = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    n, f = g.shape
    grad_h = torch.empty(n, f, dtype=g.dtype, device=g.device)
    grad_y = torch.zeros(alpha.shape[0], n, width, dtype=torch.float32, device=g.device)
    fast(_blend_backward_kernel)[_grid(n, f)](g, grad_h, grad_y, alpha, run_of, bounds, n, f,
                                              width, g.stride(0), grad_h.stride(0),
                                              I64=needs_i64(g, grad_y))
    return grad_h, grad_y
