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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, fast, pow2

BLOCK_R = 64
TILE = 4096  # elements of a correlation program's (rows, k, k) product tile, at most
BLOCK_F = 1024


@triton.jit
def _telemetry_kernel(h_ptr, stride_h, idx_ptr, valid_ptr, stats_ptr, columns_ptr, rows_ptr,
                      corr_n_ptr, sum_ptr, prod_ptr, N, R, S, F3,
                      K: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_F: tl.constexpr):
    pid = tl.program_id(0)
    if pid < S:  # seed pid's correlation sample: each (BLOCK_R, KP) tile read once
        j = tl.arange(0, KP)
        jm = j < K
        base = pid * K
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
        if pid == 0:
            tl.store(corr_n_ptr, tl.load(corr_n_ptr) + R.to(tl.float64))
    else:  # a block of the column statistics
        q = pid - S
        offs = q * BLOCK_F + tl.arange(0, BLOCK_F)
        m = offs < F3
        st = tl.load(stats_ptr + offs, mask=m, other=0.0)
        tl.store(columns_ptr + offs, tl.load(columns_ptr + offs, mask=m) + st.to(tl.float64),
                 mask=m)
        if q == 0:
            tl.store(rows_ptr, tl.load(rows_ptr) + N.to(tl.float64))


def add(stats: torch.Tensor | None, h2: torch.Tensor, corr_idx: torch.Tensor,
        corr_valid: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor,
        corr_sum: torch.Tensor, corr_prod: torch.Tensor, corr_n: torch.Tensor,
        rows_sampled: int) -> None:
    """The accumulators (float64, contiguous) += this step's: `SeedTelemetry.add`'s maths.
    `stats` None: the column statistics are already in `columns` (`triton_blend.column_stats`
    with `into`); the rows and the correlation sample are still added."""
    assert h2.dim() == 2 and h2.stride(1) == 1 and (stats is None or stats.is_contiguous())
    n = h2.shape[0]
    seeds, k = corr_sum.shape
    corr = seeds if k > 1 else 0  # chunks of one feature have no pairs to correlate
    f3 = 0 if stats is None else stats.numel()
    kp = pow2(k)
    grid = (corr + max(1, cdiv(f3, BLOCK_F)),)  # the first column program counts rows
    fast(_telemetry_kernel)[grid](
        h2, h2.stride(0), corr_idx, corr_valid.view(torch.uint8),
        columns if stats is None else stats, columns, rows, corr_n, corr_sum, corr_prod, n,
        min(n, rows_sampled), corr, f3, K=k, KP=kp,
        BLOCK_R=max(1, min(BLOCK_R, TILE // (kp * kp))), BLOCK_F=BLOCK_F)
