"""The `residual_mlp` blueprint of narrow chunks as fused Triton kernels, forward and backward.

A bank runs every slot at once on x (A, N, C) float32 with its flat parameters (A, P), the
columns laid out as the bank's views: w1 (C, H), b1 (H,), w2 (H, C), b2 (C,). For chunks of a
few features the PyTorch form (two `baddbmm`, GELU, residual) is a dozen kernels forward and
more backward, and cuBLAS's batched GEMM with an inner dimension of 4 was the largest cost of a
growing step on an H200 (2.3 ms a step at 4096 x 32768, 1,024 seeds: more than the host's own
GEMMs; benchmarks/NOTES.md, "The training step as users pay it"). Here a row's chunk goes
`chunk -> hidden -> chunk` in registers:

- forward: one program per (slot, row block): y = x + gelu(x w1 + b1) w2 + b2.
- backward: one program per (slot, row slab) recomputes the hidden layer, writes dx (only when
  x needs a gradient) and keeps the parameter gradients of its slab in registers; they are
  written as per-program partial sums (A, programs, P) and summed by one `sum` in a fixed
  order: deterministic, no atomics.

Products are float32 FMAs (no TF32), GELU is the exact (erf) form of `F.gelu`. Used where
`ops.fused_mlp_fits` says (the C columns are unrolled, and the compile grows with C^2 H): chunks
up to 8 features at the catalog's hidden width of 16; 9-64 features run as `triton_mlp_wide`'s
tile kernels (`ops.wide_mlp`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import triton_mlp_wide
from .launch import cdiv, fast, pow2
from .ops import wide_mlp

_ELEMS = 2048  # (rows, hidden) tile elements per program (BLOCK_N = _ELEMS / H, 16..128)
_PROGRAMS = 1024  # backward: about this many programs over all slots (several per SM)


# Every op below is on (rows, hidden) tiles or row vectors: a chunk's C columns are unrolled
# (`tl.static_range`), each a strided column load or store of one float per row (L1/L2 merge
# the C neighbours). Measured on an H200, 102 slots x 32,768 rows x 4 features (the bars'
# growing case): 204 us forward, 439 us backward a step (benchmarks/results/
# probe_step_h200_2026-12-01.log), still ~10x the memory bound. Two other forms lost:
# (rows, C, H) products as 3-D tiles reduced with `tl.sum` matched PyTorch under the
# interpreter but gave wrong outputs compiled (errors up to 1.3: step_h200_2026-12-01_s4a.log);
# `tl.dot` on tiles padded to 16 took 247 / 735 us in IEEE float32 and 159 / 339 us in TF32
# with 4e-3 errors (probe_mlp_h200_2026-12-01.log, every block / warp / grid choice there).
@triton.jit
def _hidden(x_ptr, p_ptr, offs, rmask, hc, W: tl.constexpr, H: tl.constexpr,
            HP: tl.constexpr, BLOCK_N: tl.constexpr):
    """The pre-activation x w1 + b1 of a row block: (BLOCK_N, HP), 0 where padded."""
    hm = hc < H
    pre = tl.zeros((BLOCK_N, HP), tl.float32) + tl.load(p_ptr + W * H + hc, mask=hm,
                                                        other=0.0)[None, :]
    for k in tl.static_range(W):
        xk = tl.load(x_ptr + offs + k, mask=rmask, other=0.0)
        pre += xk[:, None] * tl.load(p_ptr + k * H + hc, mask=hm, other=0.0)[None, :]
    return pre


@triton.jit
def _mlp_fwd_kernel(x_ptr, p_ptr, y_ptr, N, P, W: tl.constexpr, H: tl.constexpr,
                    HP: tl.constexpr, BLOCK_N: tl.constexpr):
    slot, blk = tl.program_id(0), tl.program_id(1)
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, hc = rows < N, tl.arange(0, HP)
    p_ptr += slot * P
    offs = slot.to(tl.int64) * N * W + rows * W  # (BLOCK_N,): column 0 of each row
    pre = _hidden(x_ptr, p_ptr, offs, rmask, hc, W, H, HP, BLOCK_N)
    g = 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))
    for j in tl.static_range(W):
        w2j = tl.load(p_ptr + W * H + H + hc * W + j, mask=hc < H, other=0.0)
        yj = (tl.load(x_ptr + offs + j, mask=rmask, other=0.0) + tl.sum(g * w2j[None, :], axis=1)
              + tl.load(p_ptr + 2 * W * H + H + j))
        tl.store(y_ptr + offs + j, yj, mask=rmask)


@triton.jit
def _mlp_bwd_kernel(x_ptr, p_ptr, dy_ptr, dx_ptr, part_ptr, N, P, BLOCKS_PER_PROGRAM,
                    W: tl.constexpr, H: tl.constexpr, WP: tl.constexpr, HP: tl.constexpr,
                    BLOCK_N: tl.constexpr, STORE_DX: tl.constexpr):
    slot, prog = tl.program_id(0), tl.program_id(1)
    hc, wc = tl.arange(0, HP), tl.arange(0, WP)
    hm = hc < H
    p_ptr += slot * P
    g_w1 = tl.zeros((WP, HP), tl.float32)  # row k: d w1[k, :]
    g_b1 = tl.zeros((HP,), tl.float32)
    g_w2 = tl.zeros((WP, HP), tl.float32)  # row j: d w2[:, j]
    g_b2 = tl.zeros((WP,), tl.float32)
    base = slot.to(tl.int64) * N * W
    for i in range(0, BLOCKS_PER_PROGRAM):
        rows = (prog * BLOCKS_PER_PROGRAM + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        offs = base + rows * W
        pre = _hidden(x_ptr, p_ptr, offs, rmask, hc, W, H, HP, BLOCK_N)
        cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        g = pre * cdf
        dg = tl.zeros((BLOCK_N, HP), tl.float32)
        for j in tl.static_range(W):
            dyj = tl.load(dy_ptr + offs + j, mask=rmask, other=0.0)  # 0 past N: adds nothing
            w2j = tl.load(p_ptr + W * H + H + hc * W + j, mask=hm, other=0.0)
            dg += dyj[:, None] * w2j[None, :]
            g_w2 += tl.where(wc[:, None] == j, tl.sum(g * dyj[:, None], axis=0)[None, :], 0.0)
            g_b2 += tl.where(wc == j, tl.sum(dyj, axis=0), 0.0)
        dpre = dg * (cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)  # d gelu
        g_b1 += tl.sum(dpre, axis=0)
        for k in tl.static_range(W):
            xk = tl.load(x_ptr + offs + k, mask=rmask, other=0.0)
            w1k = tl.load(p_ptr + k * H + hc, mask=hm, other=0.0)
            g_w1 += tl.where(wc[:, None] == k, tl.sum(xk[:, None] * dpre, axis=0)[None, :], 0.0)
            if STORE_DX:
                dxk = tl.load(dy_ptr + offs + k, mask=rmask, other=0.0) + tl.sum(
                    dpre * w1k[None, :], axis=1)
                tl.store(dx_ptr + offs + k, dxk, mask=rmask)
    out = part_ptr + (slot * tl.num_programs(1) + prog).to(tl.int64) * P
    wm = wc < W
    tl.store(out + wc[:, None] * H + hc[None, :], g_w1, mask=wm[:, None] & hm[None, :])
    tl.store(out + W * H + hc, g_b1, mask=hm)
    tl.store(out + W * H + H + hc[None, :] * W + wc[:, None], g_w2, mask=wm[:, None] & hm[None, :])
    tl.store(out + 2 * W * H + H + wc, g_b2, mask=wm)


@functools.lru_cache(maxsize=64)
def _form(chunk: int, hidden: int, backward: bool) -> tuple[object, dict, int]:
    """(kernel, its constexprs and launch options, rows a block) of the form that takes this
    bank: unrolled columns, or from 9 features `triton_mlp_wide`'s tiles (`ops.wide_mlp`).
    Cached: every step of every bank asks (its callers only unpack the dict)."""
    wp, hp = pow2(chunk), pow2(hidden)
    if wide_mlp(chunk, hidden):
        w = triton_mlp_wide
        wp, hp = max(w.MIN_CHUNK, wp), max(w.MIN_CHUNK, hp)
        block = w.BWD_ROWS if backward else w.FWD_ROWS
        kernel = w.mlp_bwd_kernel if backward else w.mlp_fwd_kernel
        return kernel, dict(W=chunk, H=hidden, WP=wp, HP=hp, BLOCK_N=block, num_warps=4), block
    block = max(16, min(128, _ELEMS // hp))
    meta = dict(W=chunk, H=hidden, HP=hp, BLOCK_N=block, num_warps=4)
    if backward:
        return _mlp_bwd_kernel, meta | {"WP": wp}, block
    return _mlp_fwd_kernel, meta, block


def forward(x: torch.Tensor, flat: torch.Tensor, hidden: int) -> torch.Tensor:
    """x (A, N, C) float32 contiguous, flat (A, P) -> y (A, N, C)."""
    slots, n, chunk = x.shape
    kernel, meta, block = _form(chunk, hidden, False)
    y = torch.empty_like(x)
    if n:
        fast(kernel)[(slots, cdiv(n, block))](x, flat, y, n, flat.shape[1], **meta)
    return y


def backward(x: torch.Tensor, flat: torch.Tensor, dy: torch.Tensor, hidden: int,
             need_dx: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(dx or None, dflat (A, P)) for y = forward(x, flat)."""
    slots, n, chunk = x.shape
    kernel, meta, block = _form(chunk, hidden, True)
    blocks = cdiv(n, block)
    programs = max(1, min(blocks, cdiv(_PROGRAMS, max(slots, 1))))
    per_program = cdiv(blocks, programs)
    programs = cdiv(blocks, per_program) if blocks else 1
    # every program writes all P columns of its row of partial sums (none runs without rows)
    part = (torch.empty if n else torch.zeros)(slots, programs, flat.shape[1], device=x.device,
                                               dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx else None
    if n:
        fast(kernel)[(slots, programs)](
            x, flat, dy.contiguous(), dx if need_dx else x, part, n, flat.shape[1], per_program,
            STORE_DX=need_dx, **meta)
    return dx, part.sum(1)


# ------------------------------------------------------------------ the seeds' pass on h itself
# kasmina/fused.py's node: each running lane's chunk is read from the host output h (N, F) in
# place of a gathered (A, N, C) float32 copy, goes through its blueprint and is blended back
# into h where its alpha is not 0 and its output finite. Only the running chunks' bytes move:
# the general path wrote a copy of all of h (400 us of a 4096 x 32768 bf16 step,
# benchmarks/NOTES.md "Where the growing step's 1.7 ms over bare went"). Each forward program
# also writes its partial sums of (y - x)^2, x and x^2 (the reconstruction statistics and the
# lane's finiteness), which `_seed_finish_kernel` turns into the lane's state in one launch.
#
# The seed kernels' forms, measured on an H200 at the bars' growing case (102 lanes of 4
# features, 32,768 rows, hidden 16; graft / training lanes; benchmarks/results/
# probe_seed_kernels_h200_2026-12-0{1_s7b,1_s7c,1_s7d,2_s8a}.log):
# - forward: the column form of `_mlp_fwd_kernel` 369 / 282 us; a thread a row with tuples of
#   (rows,) vectors 262 / 155 (s7), 279 / 187 with the hidden units a runtime loop (s8a: its
#   strided 2-byte stores cost ~100 us in graft); (rows, chunk) tiles 177 / 149 with the
#   hidden units unrolled (255 registers, spilling, compiled for sm_90), 186 / 150 with them a
#   runtime loop (80 registers; kept: as fast, and the loop keeps y - x cheaply).
# - backward: the column form 529 / 737; (rows, chunk) tiles 952-3,687 (a reduction across
#   threads per hidden unit and row block); a thread a row with every parameter's accumulator
#   354 / 401 (255 registers, spilling); the same over groups of 4 hidden units, y - x read
#   from the forward instead of recomputed: 277 / 308 at 32 rows x 1 warp x 8,192 programs
#   (64 x 2 x 4,096: 298 / 333; groups of 2: 528 / 587, of 8: 338 / 356), 257 / 286 at 16,384
#   programs (s8c); with each input's chunk one (rows, C) tile load, a vector a thread where
#   the chunks are aligned: 183 / 192 (kept; s9b: 257 / 288 unaligned in the same run; two row
#   blocks' loads issued before their arithmetic 182 / 200, groups of 8 280 / 287).
# Compiled locally for sm_90 (ptxas -v), without ALIGN Triton spread a row's 4 features over 4
# threads: scalar 2-byte accesses, each hidden unit's GELU computed 4 times, shared-memory
# layout changes between the loads and the arithmetic.
FWD_ROWS, FWD_WARPS = 64, 1
BWD_ROWS, BWD_WARPS, BWD_PROGRAMS, BWD_GROUP = 32, 1, 16384, 4


@triton.jit
def _lane_alpha(lane, alpha_ptr, index_ptr, blend_ptr, nonfinite_ptr):
    """The alpha a lane blends with: its seed's, where the lane blends and was finite so far."""
    a = tl.load(alpha_ptr + tl.load(index_ptr + lane)) * tl.load(blend_ptr + lane)
    return tl.where(tl.load(nonfinite_ptr + lane) != 0, 0.0, a)


@triton.jit
def _seed_fwd_kernel(h_ptr, save_ptr, diff_ptr, p_ptr, part_ptr, bounds_ptr, alpha_ptr,
                     index_ptr, blend_ptr, nonfinite_ptr, N, P, stride_h, LANE0,
                     W: tl.constexpr, H: tl.constexpr, WP: tl.constexpr,
                     BLOCK_N: tl.constexpr, SAVE: tl.constexpr, DIFF: tl.constexpr,
                     I64: tl.constexpr, ALIGN: tl.constexpr):
    """One program a (slot, row block): the lane's chunk of h through its residual_mlp, blended
    into h in place where y is finite; SAVE keeps the chunk as it was (save, in h's dtype),
    DIFF keeps y - x (float32) for the reconstruction loss's gradient. The hidden units are a
    runtime loop: unrolled, their weights took all 255 registers (spilling; room for 8 warps an
    SM), compiled for sm_90; as a loop 80. The speed did not change (s8a): not register-bound.
    With ALIGN (dividing every chunk's start and width) a row's chunk is one vector load and
    store a thread (62 registers, no shared-memory layout changes): 188 / 153 -> 180 / 131 us
    graft / training (s9b); the non-finite fallback writes x back so the store stays a vector."""
    slot, blk = tl.program_id(0), tl.program_id(1)
    lane = LANE0 + slot
    width = tl.load(bounds_ptr + 2 * lane + 1)
    sse = tl.zeros((BLOCK_N, WP), tl.float32)
    sx = tl.zeros((BLOCK_N, WP), tl.float32)
    sxx = tl.zeros((BLOCK_N, WP), tl.float32)
    if width > 0:
        start = tl.multiple_of(tl.load(bounds_ptr + 2 * lane), ALIGN)
        a = _lane_alpha(lane, alpha_ptr, index_ptr, blend_ptr, nonfinite_ptr)
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        wc = tl.arange(0, WP)
        m = (rows[:, None] < N) & ((wc // ALIGN)[None, :] < width // ALIGN)
        r = rows
        if I64:
            r = rows.to(tl.int64)
        ptr = h_ptr + r[:, None] * stride_h + start + wc[None, :]
        raw = tl.load(ptr, mask=m, other=0.0)
        x = raw.to(tl.float32)
        p = p_ptr + slot * P
        wm = wc < W
        y = x + tl.load(p + 2 * W * H + H + wc, mask=wm, other=0.0)[None, :]
        for hh in range(H):
            pre = tl.sum(x * tl.load(p + wc * H + hh, mask=wm, other=0.0)[None, :], axis=1) \
                + tl.load(p + W * H + hh)
            gl = 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))
            y += gl[:, None] * tl.load(p + W * H + H + hh * W + wc, mask=wm, other=0.0)[None, :]
        at = (slot * N + r)[:, None] * W + wc[None, :]
        if SAVE:
            tl.store(save_ptr + at, raw, mask=m)
        if a != 0.0:  # blended where y is finite (NaN fails the comparison); elsewhere the
            # chunk's own value is written back (bit for bit), so the store stays a vector
            finite = tl.abs(y) <= 3.4028234663852886e38
            tl.store(ptr, tl.where(finite, (1.0 - a) * x + a * y, x).to(raw.dtype), mask=m)
        d = tl.where(m, y - x, 0.0)
        if DIFF:
            tl.store(diff_ptr + at, d, mask=m)
        sse += d * d
        sx += x
        sxx += x * x
    out = part_ptr + (slot * tl.num_programs(1) + blk) * 3
    tl.store(out, tl.sum(tl.sum(sse, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(sx, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(sxx, axis=1), axis=0))


@triton.jit
def _seed_bwd_kernel(save_ptr, diff_ptr, g_ptr, p_ptr, part_ptr, bounds_ptr, alpha_ptr,
                     coef_ptr, N, P, stride_g, LANE0, BLOCKS_PER_PROGRAM,
                     W: tl.constexpr, WP: tl.constexpr, H: tl.constexpr, HG: tl.constexpr,
                     BLOCK_N: tl.constexpr, RECON: tl.constexpr, I64: tl.constexpr,
                     ALIGN: tl.constexpr):
    """The parameter gradients of `_seed_fwd_kernel`'s blueprints: dy = alpha g (the blend) +
    coef (y - x) (the reconstruction loss, coef = 2 / elements on TRAINING lanes, y - x the
    forward's DIFF); no dx (the blueprints' inputs are detached on this path). A thread a row,
    one program a (group of HG hidden units, slot, row slab): each gradient of the group's
    units (and b2's, kept by group 0) is a (rows,) accumulator, summed over the slab's row
    blocks and across threads once, at the end. The groups are grid axis 0, so a slab's groups
    run side by side and share its loads in L2. A row's chunk of each input is one (rows, WP)
    tile load: a vector a thread where ALIGN (dividing every chunk's start and width) and the
    pointers allow, its columns then a thread's own registers."""
    grp, slot, prog = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lane = LANE0 + slot
    width = tl.load(bounds_ptr + 2 * lane + 1)
    start = tl.multiple_of(tl.load(bounds_ptr + 2 * lane), ALIGN)
    a = tl.load(alpha_ptr + lane)
    c = tl.load(coef_ptr + lane)
    p = p_ptr + slot * P
    h0 = grp * HG
    wc = tl.arange(0, WP)
    cm = ((wc // ALIGN) < width // ALIGN)[None, :]  # the chunk's columns (width % ALIGN == 0)
    acc = ()
    for _ in tl.static_range((2 * W + 1) * HG + W):
        acc = acc + (tl.zeros((BLOCK_N,), tl.float32),)
    iters = tl.where(width > 0, BLOCKS_PER_PROGRAM, 0)
    for it in range(0, iters):
        rows = (prog * BLOCKS_PER_PROGRAM + it) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = (rows < N)[:, None] & cm
        r = rows
        if I64:
            r = rows.to(tl.int64)
        at = ((slot * N + r) * W)[:, None] + wc[None, :]
        xt = tl.load(save_ptr + at, mask=m, other=0.0).to(tl.float32)
        dyt = a * tl.load(g_ptr + (r * stride_g + start)[:, None] + wc[None, :], mask=m,
                          other=0.0).to(tl.float32)
        if RECON:
            dyt += c * tl.load(diff_ptr + at, mask=m, other=0.0)
        xs = ()
        dys = ()
        for k in tl.static_range(W):  # a thread's own columns: no cross-thread traffic
            xs = xs + (tl.sum(tl.where(wc[None, :] == k, xt, 0.0), axis=1),)
            dys = dys + (tl.sum(tl.where(wc[None, :] == k, dyt, 0.0), axis=1),)
        new = ()
        for q in tl.static_range(HG):  # each hidden unit's share of every gradient
            hh = h0 + q
            pre = tl.zeros((BLOCK_N,), tl.float32) + tl.load(p + W * H + hh)
            for k in tl.static_range(W):
                pre += xs[k] * tl.load(p + k * H + hh)
            cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
            gl = pre * cdf
            dg = tl.zeros((BLOCK_N,), tl.float32)
            for j in tl.static_range(W):
                dg += dys[j] * tl.load(p + W * H + H + hh * W + j)
            dpre = dg * (cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)  # d gelu
            for k in tl.static_range(W):
                new = new + (acc[q * (2 * W + 1) + k] + xs[k] * dpre,)
            new = new + (acc[q * (2 * W + 1) + W] + dpre,)
            for j in tl.static_range(W):
                new = new + (acc[q * (2 * W + 1) + W + 1 + j] + gl * dys[j],)
        for j in tl.static_range(W):
            new = new + (acc[HG * (2 * W + 1) + j] + dys[j],)
        acc = new
    out = part_ptr + (slot * tl.num_programs(2) + prog).to(tl.int64) * P
    for q in tl.static_range(HG):
        hh = h0 + q
        for k in tl.static_range(W):
            tl.store(out + k * H + hh, tl.sum(acc[q * (2 * W + 1) + k], axis=0))
        tl.store(out + W * H + hh, tl.sum(acc[q * (2 * W + 1) + W], axis=0))
        for j in tl.static_range(W):
            tl.store(out + W * H + H + hh * W + j, tl.sum(acc[q * (2 * W + 1) + W + 1 + j], axis=0))
    if grp == 0:
        for j in tl.static_range(W):
            tl.store(out + 2 * W * H + H + j, tl.sum(acc[HG * (2 * W + 1) + j], axis=0))


@triton.jit
def _seed_finish_kernel(part_ptr, BLOCKS, alpha_ptr, index_ptr, blend_ptr, nonfinite_ptr,
                        running_ptr, train_ptr, sizes_ptr, recon_ptr, used_ptr, coef_ptr, N,
                        LANE0, RECON: tl.constexpr, BLOCK: tl.constexpr):
    """A lane's state after `_seed_fwd_kernel`, one program a lane: its partial sums summed;
    non-finite from now on if (y - x)^2 summed to inf or NaN; the alpha the backward uses (0
    where not finite); with RECON, the EMA of mse / var(x) on finite TRAINING lanes (the
    formula of `KasminaLayer._track_reconstruction`) and the loss's 2 / elements there."""
    slot = tl.program_id(0)
    lane = LANE0 + slot
    offs = tl.arange(0, BLOCK)
    sse = tl.zeros((BLOCK,), tl.float32)
    sx = tl.zeros((BLOCK,), tl.float32)
    sxx = tl.zeros((BLOCK,), tl.float32)
    for b0 in range(0, BLOCKS, BLOCK):
        m = b0 + offs < BLOCKS
        row = part_ptr + (slot * BLOCKS + b0 + offs) * 3
        sse += tl.load(row, mask=m, other=0.0)
        sx += tl.load(row + 1, mask=m, other=0.0)
        sxx += tl.load(row + 2, mask=m, other=0.0)
    sse, sx, sxx = tl.sum(sse, axis=0), tl.sum(sx, axis=0), tl.sum(sxx, axis=0)
    a = _lane_alpha(lane, alpha_ptr, index_ptr, blend_ptr, nonfinite_ptr)
    ok = (tl.load(nonfinite_ptr + lane) == 0) & (
        (tl.load(running_ptr + lane) == 0) | (tl.abs(sse) <= 3.4028234663852886e38))
    tl.store(nonfinite_ptr + lane, (~ok).to(tl.int1))
    tl.store(used_ptr + lane, tl.where(ok, a, 0.0))
    coef = 0.0
    if RECON:
        elems = tl.load(sizes_ptr + lane) * N
        mse, mean = sse / elems, sx / elems
        ratio = mse / tl.maximum(sxx / elems - mean * mean, 1e-12)
        old = tl.load(recon_ptr + lane)
        ema = tl.where(old != old, ratio, 0.9 * old + 0.1 * ratio)  # NaN: the first
        train = ok & (tl.load(train_ptr + lane) != 0)
        tl.store(recon_ptr + lane, tl.where(train, ema, old))
        coef = tl.where(train, 2.0 / elems, 0.0)
    tl.store(coef_ptr + lane, coef)


@triton.jit
def _feature_scale_kernel(run_ptr, used_ptr, out_ptr, F, BLOCK: tl.constexpr):
    """D of the host's gradient: 1 - alpha on each blended feature, 1 elsewhere."""
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = f < F
    run = tl.load(run_ptr + f, mask=m, other=-1)
    a = tl.load(used_ptr + run, mask=m & (run >= 0), other=0.0)
    tl.store(out_ptr + f, 1.0 - a, mask=m)


def seed_forward(h: torch.Tensor, flat: torch.Tensor, chunk: int, hidden: int, lanes: dict,
                 lane0: int, save: bool, recon: bool, used: torch.Tensor, coef: torch.Tensor,
                 align: int = 1) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One bank's running lanes through their blueprints and blended into h (N, F) in place.
    `lanes`: the layer's lane tensors by name (bounds, lane_index, lane_blend, lane_nonfinite,
    lane_running, lane_train, lane_sizes, lane_recon) and its seeds' alpha; the bank's slots are
    its lanes lane0.... Updates lane_nonfinite (and lane_recon with `recon`) and writes the
    lanes' `used` alpha and loss `coef` for `seed_backward`. Returns, for the backward (None
    without `save`): the chunks as they were, (A, N, C) in h's dtype, and with `recon` their
    y - x (A, N, C) float32. `align` (a power of two) divides every lane's chunk start and
    width: the kernels' loads and stores of a row's chunk are then one vector each."""
    assert h.dim() == 2 and h.stride(1) == 1, "h must be (N, F) with contiguous rows"
    slots, n = flat.shape[0], h.shape[0]
    blocks = max(1, cdiv(n, FWD_ROWS))
    part = torch.empty(slots, blocks, 3, device=h.device, dtype=torch.float32)
    kept = torch.empty(slots, n, chunk, device=h.device, dtype=h.dtype) if save else None
    diff = (torch.empty(slots, n, chunk, device=h.device, dtype=torch.float32)
            if save and recon else None)
    i64 = max(h.shape[0] * h.stride(0), slots * n * chunk) >= 2**31 - 1
    alpha = (lanes["alpha"], lanes["lane_index"], lanes["lane_blend"], lanes["lane_nonfinite"])
    fast(_seed_fwd_kernel)[(slots, blocks)](
        h, kept if save else h, h if diff is None else diff, flat, part, lanes["bounds"],
        *alpha, n, flat.shape[1], h.stride(0), lane0, W=chunk, H=hidden,
        WP=pow2(chunk), BLOCK_N=FWD_ROWS, SAVE=save, DIFF=diff is not None,
        I64=i64, ALIGN=align, num_warps=FWD_WARPS)
    fast(_seed_finish_kernel)[(slots,)](
        part, blocks, *alpha, lanes["lane_running"], lanes["lane_train"], lanes["lane_sizes"],
        lanes["lane_recon"], used, coef, n, lane0, RECON=recon, BLOCK=256, num_warps=1)
    return kept, diff


def feature_scale(run_of: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    f = run_of.shape[0]
    out = torch.empty(f, device=used.device, dtype=torch.float32)
    fast(_feature_scale_kernel)[(cdiv(f, 1024),)](run_of, used, out, f, BLOCK=1024)
    return out


@triton.jit
def _feature_mul_kernel(src_ptr, dst_ptr, scale_ptr, R, C, stride_src, stride_dst,
                        ROWS: tl.constexpr, SKIP: tl.constexpr, BR: tl.constexpr,
                        BC: tl.constexpr):
    """dst = src * D (float32 product, one rounding to dst's dtype), D a row's or a column's
    scale; SKIP (in place): a tile whose features all have D = 1 is left alone."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    if ROWS:
        s = tl.load(scale_ptr + r, mask=r < R, other=1.0)[:, None]
    else:
        s = tl.load(scale_ptr + c, mask=c < C, other=1.0)[None, :]
    if (not SKIP) or tl.max(tl.max(tl.abs(s - 1.0), axis=1), axis=0) > 0.0:
        m = (r < R)[:, None] & (c < C)[None, :]
        r64 = r.to(tl.int64)[:, None]
        v = tl.load(src_ptr + r64 * stride_src + c[None, :], mask=m, other=0.0)
        tl.store(dst_ptr + r64 * stride_dst + c[None, :], (v.to(tl.float32) * s).to(
            dst_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)


def feature_mul(src: torch.Tensor, scale: torch.Tensor, rows: bool,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """src (R, C) times the feature scale D (float32, R long if `rows` else C), into `out`
    (a new tensor of src's dtype by default; `out=src` in place, skipping unscaled tiles):
    one launch where `torch.mul` of a bf16 matrix by a float32 vector took ~4x its bytes
    (73 us for W at 4096 x 4096 on an H200, s7d)."""
    if out is not src:
        src = src.contiguous()
    assert src.stride(1) == 1
    dst = torch.empty_like(src, memory_format=torch.contiguous_format) if out is None else out
    r, c = src.shape
    br, bc = 16, 256
    fast(_feature_mul_kernel)[(cdiv(r, br), cdiv(c, bc))](
        src, dst, scale, r, c, src.stride(0), dst.stride(0), ROWS=rows, SKIP=dst is src,
        BR=br, BC=bc, num_warps=4)
    return dst


def seed_backward(kept: torch.Tensor, diff: torch.Tensor | None, g: torch.Tensor,
                  flat: torch.Tensor, hidden: int, bounds: torch.Tensor, alpha: torch.Tensor,
                  coef: torch.Tensor, lane0: int, recon: bool, align: int = 1) -> torch.Tensor:
    """d flat (A, P) of `seed_forward`'s blueprints for the output gradient g (N, F): kept and
    diff are what it returned, alpha and coef its `used` and `coef`; `recon` and `align` as
    there."""
    assert g.stride(1) == 1
    slots, n, chunk = kept.shape
    blocks = cdiv(n, BWD_ROWS)
    group = max(d for d in range(1, BWD_GROUP + 1) if hidden % d == 0)
    groups = hidden // group
    programs = max(1, min(blocks, cdiv(BWD_PROGRAMS, max(slots * groups, 1))))
    per_program = cdiv(blocks, programs)
    programs = cdiv(blocks, per_program) if blocks else 1
    part = torch.empty(slots, programs, flat.shape[1], device=g.device, dtype=torch.float32)
    i64 = max(g.shape[0] * g.stride(0), kept.numel()) >= 2**31 - 1
    fast(_seed_bwd_kernel)[(groups, slots, programs)](
        kept, kept if diff is None else diff, g, flat, part, bounds, alpha, coef, n,
        flat.shape[1], g.stride(0), lane0, per_program, W=chunk,
        WP=pow2(chunk), H=hidden, HG=group, BLOCK_N=BWD_ROWS,
        RECON=recon, I64=i64, ALIGN=align, num_warps=BWD_WARPS)
    return part.sum(1)
