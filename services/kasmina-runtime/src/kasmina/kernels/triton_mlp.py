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
