"""One Triton launch for the step's telemetry accumulation (`SeedTelemetry.add`, eager CUDA).

The PyTorch form is a dozen small kernels a tracking step (the column sums added into the
float64 accumulators, the row count, and the correlation sample: gather, cast, mask, sum,
outer products, casts and adds), each a host launch; a dormant layer tracks every step by
default, so on small layers that host time was most of a dormant layer's cost
(benchmarks/NOTES.md, "Legacy vs chunked paths": dormant 2.1x bare at 256 rows on an H200,
bound by the host CPU). Here one grid does it all:

- programs 0 .. S-1 (one per seed, only when chunks have pairs to correlate): the seed's k
  sampled features of the first R rows, summed and multiplied pairwise (float32, a row block
  at a time, read once: the (rows, k, k) products reduced over rows), added into its own
  (k,) and (k, k) float64 accumulators: every accumulator has one owner, so no atomics and the
  same result every run;
- the next programs add the step's (3, F) float32 column statistics into the (3, F) float64
  ones, and the first of them counts the rows.

`observe`, where no blend computed the statistics (a dormant layer's tracking step), is one
launch too: the host pass's column tiles (`triton_blend.column_slab`, adding into the float64
accumulators) and then the correlation programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, fast, pow2
from .triton_blend import COLUMN_CONFIGS, column_slab, needs_i64

BLOCK_R = 64
TILE = 4096  # elements of a correlation program's (rows, k, k) product tile, at most
BLOCK_F = 1024


@triton.jit
def _correlation_sample(h_ptr, stride_h, idx_ptr, valid_ptr, corr_n_ptr, sum_ptr, prod_ptr, R,
                        seed, K: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr):
    """Seed `seed`'s k sampled features of the first R rows, each (BLOCK_R, KP) tile read once,
    added into its (k,) and (k, k) float64 accumulators; seed 0 counts the sampled rows."""
    j = tl.arange(0, KP)
    jm = j < K
    base = seed * K
    idx = tl.load(idx_ptr + base + j, mask=jm, other=0)
    # Padded features are multiplied by 0, as `sample * corr_valid` does (NaN stays NaN).
    use = tl.load(valid_ptr + base + j, mask=jm, other=0).to(tl.float32)[None, :]
    acc = tl.zeros((KP,), tl.float32)
    prod = tl.zeros((KP, KP), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        x = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + idx[None, :],
                    mask=(rows < R)[:, None] & jm[None, :], other=0.0).to(tl.float32) * use
        acc += tl.sum(x, axis=0)
        prod += tl.sum(x[:, :, None] * x[:, None, :], axis=0)
    tl.store(sum_ptr + base + j, tl.load(sum_ptr + base + j, mask=jm) + acc.to(tl.float64),
             mask=jm)
    at = prod_ptr + (base + j)[:, None] * K + j[None, :]
    pm = jm[:, None] & jm[None, :]
    tl.store(at, tl.load(at, mask=pm) + prod.to(tl.float64), mask=pm)
    if seed == 0:
        tl.store(corr_n_ptr, tl.load(corr_n_ptr) + R.to(tl.float64))


@triton.jit
def _telemetry_kernel(h_ptr, stride_h, idx_ptr, valid_ptr, stats_ptr, columns_ptr, rows_ptr,
                      corr_n_ptr, sum_ptr, prod_ptr, N, R, S, F3,
                      K: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_F: tl.constexpr):
    pid = tl.program_id(0)
    if pid < S:  # seed pid's correlation sample
        _correlation_sample(h_ptr, stride_h, idx_ptr, valid_ptr, corr_n_ptr, sum_ptr, prod_ptr,
                            R, pid, K, KP, BLOCK_R)
    else:  # a block of the column statistics
        q = pid - S
        offs = q * BLOCK_F + tl.arange(0, BLOCK_F)
        m = offs < F3
        st = tl.load(stats_ptr + offs, mask=m, other=0.0)
        tl.store(columns_ptr + offs, tl.load(columns_ptr + offs, mask=m) + st.to(tl.float64),
                 mask=m)
        if q == 0:
            tl.store(rows_ptr, tl.load(rows_ptr) + N.to(tl.float64))


@triton.autotune(configs=COLUMN_CONFIGS, key=["N", "F", "I64"],
                 restore_value=["columns_ptr", "rows_ptr", "corr_n_ptr", "sum_ptr", "prod_ptr"])
@triton.jit
def _observe_kernel(h_ptr, stride_h, idx_ptr, valid_ptr, columns_ptr, rows_ptr, corr_n_ptr,
                    sum_ptr, prod_ptr, N, R, F, dead_threshold, K: tl.constexpr,
                    KP: tl.constexpr, BLOCK_R: tl.constexpr, I64: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                    SLABS_PER_TILE: tl.constexpr):
    # programs 0 .. tiles*slabs-1: the host pass's column tiles x row slabs (`_grid`'s count),
    # adding into the float64 columns; then one program per seed's correlation sample
    pid = tl.program_id(0)
    tiles = tl.cdiv(F, BLOCK_F)
    slabs = tl.minimum(tl.cdiv(N, BLOCK_N), SLABS_PER_TILE)
    if pid < tiles * slabs:
        column_slab(h_ptr, h_ptr, columns_ptr, N, F, stride_h, stride_h, dead_threshold,
                    pid % tiles, pid // tiles, slabs, True, False, I64, BLOCK_N, BLOCK_F)
        if pid == 0:
            tl.store(rows_ptr, tl.load(rows_ptr) + N.to(tl.float64))
    else:
        _correlation_sample(h_ptr, stride_h, idx_ptr, valid_ptr, corr_n_ptr, sum_ptr, prod_ptr,
                            R, pid - tiles * slabs, K, KP, BLOCK_R)


def _sample_shape(corr_sum: torch.Tensor) -> tuple[int, int, int, int]:
    """(correlation programs, k, k padded to a power of two, BLOCK_R): chunks of one feature
    have no pairs to correlate, so no programs."""
    seeds, k = corr_sum.shape
    kp = pow2(k)
    return seeds if k > 1 else 0, k, kp, max(1, min(BLOCK_R, TILE // (kp * kp)))


def add(stats: torch.Tensor, h2: torch.Tensor, corr_idx: torch.Tensor,
        corr_valid: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor,
        corr_sum: torch.Tensor, corr_prod: torch.Tensor, corr_n: torch.Tensor,
        rows_sampled: int) -> None:
    """The accumulators (float64, contiguous) += this step's: `SeedTelemetry.add`'s maths, with
    the (3, F) float32 column statistics `stats` of h2 (N, F) a blend computed."""
    assert h2.dim() == 2 and h2.stride(1) == 1 and stats.is_contiguous()
    corr, k, kp, block_r = _sample_shape(corr_sum)
    f3 = stats.numel()
    grid = (corr + max(1, cdiv(f3, BLOCK_F)),)  # the first column program counts rows
    fast(_telemetry_kernel)[grid](
        h2, h2.stride(0), corr_idx, corr_valid.view(torch.uint8), stats, columns, rows, corr_n,
        corr_sum, corr_prod, h2.shape[0], min(h2.shape[0], rows_sampled), corr, f3, K=k, KP=kp,
        BLOCK_R=block_r, BLOCK_F=BLOCK_F)


def observe(h2: torch.Tensor, dead_threshold: float, corr_idx: torch.Tensor,
            corr_valid: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor,
            corr_sum: torch.Tensor, corr_prod: torch.Tensor, corr_n: torch.Tensor,
            rows_sampled: int) -> None:
    """A dormant layer's tracking step in one launch: the host pass's column statistics of h2
    (N, F) added straight into the float64 `columns`, the rows counted and the correlation
    sample added (`add` of `triton_blend.column_stats`'s statistics, without the second
    launch: ~25-33 us of host time on the H200 machine, probe_tracking_h200_2026-12-04_s14a)."""
    assert h2.dim() == 2 and h2.stride(1) == 1
    n, f = h2.shape
    corr, k, kp, block_r = _sample_shape(corr_sum)

    def grid(meta: dict) -> tuple[int]:
        slabs = min(cdiv(n, meta["BLOCK_N"]), meta["SLABS_PER_TILE"])
        return (cdiv(f, meta["BLOCK_F"]) * slabs + corr,)
    fast(_observe_kernel)[grid](
        h2, h2.stride(0), corr_idx, corr_valid.view(torch.uint8), columns, rows, corr_n,
        corr_sum, corr_prod, n, min(n, rows_sampled), f, dead_threshold, K=k, KP=kp,
        BLOCK_R=block_r, I64=needs_i64(h2))
