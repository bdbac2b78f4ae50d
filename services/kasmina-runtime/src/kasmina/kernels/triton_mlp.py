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

Products are float32 FMAs (no TF32), GELU is the exact (erf) form of `F.gelu`. Used where the
padded C * H is at most 1,024 (`ops.fused_mlp_fits`; the C columns are unrolled): chunks up to
64 features at the catalog's hidden width of 16. Wider chunks keep the batched GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


def _meta(chunk: int, hidden: int) -> tuple[int, int, int]:
    wp, hp = triton.next_power_of_2(chunk), triton.next_power_of_2(hidden)
    return wp, hp, max(16, min(128, _ELEMS // hp))


def forward(x: torch.Tensor, flat: torch.Tensor, hidden: int) -> torch.Tensor:
    """x (A, N, C) float32 contiguous, flat (A, P) -> y (A, N, C)."""
    slots, n, chunk = x.shape
    wp, hp, block = _meta(chunk, hidden)
    y = torch.empty_like(x)
    if n:
        _mlp_fwd_kernel[(slots, triton.cdiv(n, block))](
            x, flat, y, n, flat.shape[1], W=chunk, H=hidden, HP=hp, BLOCK_N=block, num_warps=4)
    return y


def backward(x: torch.Tensor, flat: torch.Tensor, dy: torch.Tensor, hidden: int,
             need_dx: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(dx or None, dflat (A, P)) for y = forward(x, flat)."""
    slots, n, chunk = x.shape
    wp, hp, block = _meta(chunk, hidden)
    blocks = triton.cdiv(n, block)
    programs = max(1, min(blocks, triton.cdiv(_PROGRAMS, max(slots, 1))))
    per_program = triton.cdiv(blocks, programs)
    programs = triton.cdiv(blocks, per_program) if blocks else 1
    # every program writes all P columns of its row of partial sums
    part = torch.empty(slots, programs, flat.shape[1], device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_dx else None
    if n:
        _mlp_bwd_kernel[(slots, programs)](
            x, flat, dy.contiguous(), dx if need_dx else x, part, n, flat.shape[1], per_program,
            W=chunk, H=hidden, WP=wp, HP=hp, BLOCK_N=block, STORE_DX=need_dx, num_warps=4)
    return dx, part.sum(1)


# ------------------------------------------------------------------ the seeds' pass on h itself
# kasmina/fused.py's forward: each running lane's chunk is read from the host output h (N, F)
# in place of a gathered (A, N, C) copy, goes through the blueprint as `_mlp_fwd_kernel` does
# (the same products in the same order) and is blended back into h where its alpha is not 0 and
# its output finite. Only the running chunks' bytes move: the general path wrote a copy of all
# of h (400 us of a 4096 x 32768 bf16 step, benchmarks/NOTES.md "Where the growing step's 1.7 ms
# over bare went"). Each program also writes its partial sums of (y - x)^2, x and x^2 for the
# reconstruction loss's statistics and the lane's finiteness.
@triton.jit
def _seed_fwd_kernel(h_ptr, save_ptr, p_ptr, part_ptr, bounds_ptr, alpha_ptr, N, P, stride_h,
                     LANE0, W: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                     BLOCK_N: tl.constexpr, SAVE: tl.constexpr, I64: tl.constexpr):
    slot, blk = tl.program_id(0), tl.program_id(1)
    lane = LANE0 + slot
    width = tl.load(bounds_ptr + 2 * lane + 1)
    sse = tl.zeros((BLOCK_N,), tl.float32)
    sx = tl.zeros((BLOCK_N,), tl.float32)
    sxx = tl.zeros((BLOCK_N,), tl.float32)
    if width > 0:
        start = tl.load(bounds_ptr + 2 * lane)
        a = tl.load(alpha_ptr + lane)
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, hc = rows < N, tl.arange(0, HP)
        hm = hc < H
        wide = tl.zeros((BLOCK_N,), tl.int32) + width  # (a scalar in a mask: the interpreter)
        r = rows
        if I64:
            r = rows.to(tl.int64)
        hrow = h_ptr + r * stride_h + start
        srow = save_ptr + (slot * N + r) * W
        p = p_ptr + slot * P
        pre = tl.zeros((BLOCK_N, HP), tl.float32) + tl.load(p + W * H + hc, mask=hm,
                                                            other=0.0)[None, :]
        for k in tl.static_range(W):
            xk = tl.load(hrow + k, mask=rmask & (wide > k), other=0.0).to(tl.float32)
            pre += xk[:, None] * tl.load(p + k * H + hc, mask=hm, other=0.0)[None, :]
        g = 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        for j in tl.static_range(W):
            mj = rmask & (wide > j)
            raw = tl.load(hrow + j, mask=mj, other=0.0)
            xj = raw.to(tl.float32)
            w2j = tl.load(p + W * H + H + hc * W + j, mask=hm, other=0.0)
            yj = xj + tl.sum(g * w2j[None, :], axis=1) + tl.load(p + 2 * W * H + H + j)
            if SAVE:
                tl.store(srow + j, raw, mask=mj)
            if a != 0.0:  # blended where y is finite (NaN fails the comparison)
                finite = tl.abs(yj) <= 3.4028234663852886e38
                tl.store(hrow + j, ((1.0 - a) * xj + a * yj).to(raw.dtype), mask=mj & finite)
            d = tl.where(mj, yj - xj, 0.0)
            sse += d * d
            sx += xj
            sxx += xj * xj
    out = part_ptr + (slot * tl.num_programs(1) + blk) * 3
    tl.store(out, tl.sum(sse, axis=0))
    tl.store(out + 1, tl.sum(sx, axis=0))
    tl.store(out + 2, tl.sum(sxx, axis=0))


@triton.jit
def _seed_bwd_kernel(save_ptr, g_ptr, p_ptr, part_ptr, bounds_ptr, alpha_ptr, coef_ptr, N, P,
                     stride_g, LANE0, BLOCKS_PER_PROGRAM, W: tl.constexpr, H: tl.constexpr,
                     WP: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr,
                     I64: tl.constexpr):
    """The parameter gradients of `_seed_fwd_kernel`'s blueprints: dy = alpha g (the blend) +
    coef (y - x) (the reconstruction loss, coef = 2 / elements on TRAINING lanes), the rest as
    `_mlp_bwd_kernel` (no dx: the blueprints' inputs are detached on this path)."""
    slot, prog = tl.program_id(0), tl.program_id(1)
    lane = LANE0 + slot
    width = tl.load(bounds_ptr + 2 * lane + 1)
    start = tl.load(bounds_ptr + 2 * lane)
    a = tl.load(alpha_ptr + lane)
    c = tl.load(coef_ptr + lane)
    hc, wc = tl.arange(0, HP), tl.arange(0, WP)
    hm = hc < H
    p = p_ptr + slot * P
    g_w1 = tl.zeros((WP, HP), tl.float32)  # row k: d w1[k, :]
    g_b1 = tl.zeros((HP,), tl.float32)
    g_w2 = tl.zeros((WP, HP), tl.float32)  # row j: d w2[:, j]
    g_b2 = tl.zeros((WP,), tl.float32)
    iters = tl.where(width > 0, BLOCKS_PER_PROGRAM, 0)
    for i in range(0, iters):
        rows = (prog * BLOCKS_PER_PROGRAM + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        wide = tl.zeros((BLOCK_N,), tl.int32) + width
        r = rows
        if I64:
            r = rows.to(tl.int64)
        srow = save_ptr + (slot * N + r) * W
        grow = g_ptr + r * stride_g + start
        pre = tl.zeros((BLOCK_N, HP), tl.float32) + tl.load(p + W * H + hc, mask=hm,
                                                            other=0.0)[None, :]
        for k in tl.static_range(W):
            xk = tl.load(srow + k, mask=rmask & (wide > k), other=0.0).to(tl.float32)
            pre += xk[:, None] * tl.load(p + k * H + hc, mask=hm, other=0.0)[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        gl = pre * cdf
        dg = tl.zeros((BLOCK_N, HP), tl.float32)
        for j in tl.static_range(W):
            mj = rmask & (wide > j)
            w2j = tl.load(p + W * H + H + hc * W + j, mask=hm, other=0.0)
            dyj = a * tl.load(grow + j, mask=mj, other=0.0).to(tl.float32)
            if c != 0.0:  # y - x, recomputed
                rj = tl.sum(gl * w2j[None, :], axis=1) + tl.load(p + 2 * W * H + H + j)
                dyj += c * tl.where(mj, rj, 0.0)
            dg += dyj[:, None] * w2j[None, :]
            g_w2 += tl.where(wc[:, None] == j, tl.sum(gl * dyj[:, None], axis=0)[None, :], 0.0)
            g_b2 += tl.where(wc == j, tl.sum(dyj, axis=0), 0.0)
        dpre = dg * (cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)  # d gelu
        g_b1 += tl.sum(dpre, axis=0)
        for k in tl.static_range(W):
            xk = tl.load(srow + k, mask=rmask & (wide > k), other=0.0).to(tl.float32)
            g_w1 += tl.where(wc[:, None] == k, tl.sum(xk[:, None] * dpre, axis=0)[None, :], 0.0)
    out = part_ptr + (slot * tl.num_programs(1) + prog).to(tl.int64) * P
    wm = wc < W
    tl.store(out + wc[:, None] * H + hc[None, :], g_w1, mask=wm[:, None] & hm[None, :])
    tl.store(out + W * H + hc, g_b1, mask=hm)
    tl.store(out + W * H + H + hc[None, :] * W + wc[:, None], g_w2, mask=wm[:, None] & hm[None, :])
    tl.store(out + 2 * W * H + H + wc, g_b2, mask=wm)


def seed_forward(h: torch.Tensor, flat: torch.Tensor, chunk: int, hidden: int,
                 bounds: torch.Tensor, alpha: torch.Tensor, lane0: int, save: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One bank's running lanes through their blueprints and blended into h (N, F) in place.
    bounds (L, 2) int32 and alpha (L,) float32 are the layer's, the bank's slots its lanes
    lane0.... Returns (the chunks as they were, (A, N, C) in h's dtype, for the backward, or
    None without `save`; per-lane sums (A, 3) float32 of (y - x)^2, x and x^2)."""
    assert h.dim() == 2 and h.stride(1) == 1, "h must be (N, F) with contiguous rows"
    slots, n = flat.shape[0], h.shape[0]
    _, hp, block = _meta(chunk, hidden)
    blocks = max(1, triton.cdiv(n, block))
    part = torch.empty(slots, blocks, 3, device=h.device, dtype=torch.float32)
    kept = torch.empty(slots, n, chunk, device=h.device, dtype=h.dtype) if save else None
    i64 = max(h.shape[0] * h.stride(0), slots * n * chunk) >= 2**31 - 1
    _seed_fwd_kernel[(slots, blocks)](
        h, kept if save else h, flat, part, bounds, alpha, n, flat.shape[1], h.stride(0), lane0,
        W=chunk, H=hidden, HP=hp, BLOCK_N=block, SAVE=save, I64=i64, num_warps=4)
    return kept, part.sum(1)


def seed_backward(kept: torch.Tensor, g: torch.Tensor, flat: torch.Tensor, hidden: int,
                  bounds: torch.Tensor, alpha: torch.Tensor, coef: torch.Tensor, lane0: int
                  ) -> torch.Tensor:
    """d flat (A, P) of `seed_forward`'s blueprints for the output gradient g (N, F)."""
    assert g.stride(1) == 1
    slots, n, chunk = kept.shape
    wp, hp, block = _meta(chunk, hidden)
    blocks = triton.cdiv(n, block)
    programs = max(1, min(blocks, triton.cdiv(_PROGRAMS, max(slots, 1))))
    per_program = triton.cdiv(blocks, programs)
    programs = triton.cdiv(blocks, per_program) if blocks else 1
    part = torch.empty(slots, programs, flat.shape[1], device=g.device, dtype=torch.float32)
    i64 = max(g.shape[0] * g.stride(0), kept.numel()) >= 2**31 - 1
    _seed_bwd_kernel[(slots, programs)](
        kept, g, flat, part, bounds, alpha, coef, n, flat.shape[1], g.stride(0), lane0,
        per_program, W=chunk, H=hidden, WP=wp, HP=hp, BLOCK_N=block, I64=i64, num_warps=4)
    return part.sum(1)
