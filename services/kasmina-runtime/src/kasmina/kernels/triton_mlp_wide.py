"""The `residual_mlp` blueprint of wide chunks (9-64 features, padded to 16-64) as fused
Triton kernels on tiles, forward and backward: `triton_mlp`'s layout and contract (x (A, N, C)
float32, flat (A, P) with w1 (C, H), b1 (H,), w2 (H, C), b2 (C,)), each product a `tl.dot`.

`triton_mlp`'s kernels unroll a chunk's columns, and its backward reduces across the rows of
every block for each of them: at 16 features, 51 slots x 8,192 rows, 470 us a call inside a
wrapped GPT-style model's growing step, most of its cost (benchmarks/NOTES.md, "A whole model's
step"); alone 151 / 837 us forward / backward, here 46 / 135 (H200, s14g). A row block is
a (rows, C) tile: forward pre = x w1 + b1, y = x + gelu(pre) w2 + b2; backward
dg = dy w2^T, dpre = dg gelu'(pre), dx = dy + dpre w1^T, and the parameter gradients x^T dpre,
gelu(pre)^T dy summed over a program's row slab in the dot's accumulators, written as partial
sums (A, programs, P) and summed in a fixed order (deterministic, no atomics), as there.
Products in TF32x3 (three TF32 products: float32's accuracy, 5e-7 against float64 in a probe at
16 features, probe_mlp_h200_2026-12-01.log, where plain TF32 erred by 2.5e-3). The compile does
not grow with C (no unrolled columns). Which banks take it: `ops.wide_mlp`; launched by
`triton_mlp.forward` / `backward`.
"""

from __future__ import annotations

import triton
import triton.language as tl

MIN_CHUNK = 16  # tl.dot's smallest tile side (the hidden units are padded up to it)
FWD_ROWS = BWD_ROWS = 64  # the probe's best at 16 features (block 64, 4 warps)


@triton.jit
def _weights(p, W: tl.constexpr, H: tl.constexpr, WP: tl.constexpr, HP: tl.constexpr):
    """A slot's w1 (WP, HP), b1 (HP,), w2 (HP, WP), b2 (WP,), zero where padded."""
    wc, hc = tl.arange(0, WP), tl.arange(0, HP)
    wm, hm = wc < W, hc < H
    w1 = tl.load(p + wc[:, None] * H + hc[None, :], mask=wm[:, None] & hm[None, :], other=0.0)
    b1 = tl.load(p + W * H + hc, mask=hm, other=0.0)
    w2 = tl.load(p + W * H + H + hc[:, None] * W + wc[None, :], mask=hm[:, None] & wm[None, :],
                 other=0.0)
    b2 = tl.load(p + 2 * W * H + H + wc, mask=wm, other=0.0)
    return w1, b1, w2, b2


@triton.jit
def mlp_fwd_kernel(x_ptr, p_ptr, y_ptr, N, P, W: tl.constexpr, H: tl.constexpr,
                    WP: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr):
    slot, blk = tl.program_id(0), tl.program_id(1)
    rows, wc = blk * BLOCK_N + tl.arange(0, BLOCK_N), tl.arange(0, WP)
    w1, b1, w2, b2 = _weights(p_ptr + slot * P, W, H, WP, HP)
    at = slot.to(tl.int64) * N * W + rows[:, None] * W + wc[None, :]
    m = (rows < N)[:, None] & (wc < W)[None, :]
    x = tl.load(x_ptr + at, mask=m, other=0.0)  # (BLOCK_N, WP)
    pre = tl.dot(x, w1, input_precision="tf32x3") + b1[None, :]  # (BLOCK_N, HP)
    g = 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))
    y = x + tl.dot(g, w2, input_precision="tf32x3") + b2[None, :]
    tl.store(y_ptr + at, y, mask=m)


@triton.jit
def mlp_bwd_kernel(x_ptr, p_ptr, dy_ptr, dx_ptr, part_ptr, N, P, BLOCKS_PER_PROGRAM,
                    W: tl.constexpr, H: tl.constexpr, WP: tl.constexpr, HP: tl.constexpr,
                    BLOCK_N: tl.constexpr, STORE_DX: tl.constexpr):
    slot, prog = tl.program_id(0), tl.program_id(1)
    wc, hc = tl.arange(0, WP), tl.arange(0, HP)
    wm, hm = wc < W, hc < H
    w1, b1, w2, _ = _weights(p_ptr + slot * P, W, H, WP, HP)
    g_w1 = tl.zeros((WP, HP), tl.float32)
    g_b1 = tl.zeros((HP,), tl.float32)
    g_w2 = tl.zeros((HP, WP), tl.float32)
    g_b2 = tl.zeros((WP,), tl.float32)
    base = slot.to(tl.int64) * N * W
    for i in range(0, BLOCKS_PER_PROGRAM):
        rows = (prog * BLOCKS_PER_PROGRAM + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        at = base + rows[:, None] * W + wc[None, :]
        m = (rows < N)[:, None] & wm[None, :]
        x = tl.load(x_ptr + at, mask=m, other=0.0)
        dy = tl.load(dy_ptr + at, mask=m, other=0.0)  # 0 past N: adds nothing below
        pre = tl.dot(x, w1, input_precision="tf32x3") + b1[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        dg = tl.dot(dy, tl.trans(w2), input_precision="tf32x3")  # (BLOCK_N, HP)
        dpre = dg * (cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)  # d gelu
        g_w1 = tl.dot(tl.trans(x), dpre, g_w1, input_precision="tf32x3")
        g_b1 += tl.sum(dpre, axis=0)
        g_w2 = tl.dot(tl.trans(pre * cdf), dy, g_w2, input_precision="tf32x3")
        g_b2 += tl.sum(dy, axis=0)
        if STORE_DX:
            dx = dy + tl.dot(dpre, tl.trans(w1), input_precision="tf32x3")
            tl.store(dx_ptr + at, dx, mask=m)
    out = part_ptr + (slot * tl.num_programs(1) + prog).to(tl.int64) * P
    tl.store(out + wc[:, None] * H + hc[None, :], g_w1, mask=wm[:, None] & hm[None, :])
    tl.store(out + W * H + hc, g_b1, mask=hm)
    tl.store(out + W * H + H + hc[:, None] * W + wc[None, :], g_w2, mask=hm[:, None] & wm[None, :])
    tl.store(out + 2 * W * H + H + wc, g_b2, mask=wm)
