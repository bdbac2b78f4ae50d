"""The seeds' optimizer step over one bank as one Triton kernel: `BlueprintBank.seed_step`'s
masked Adam(W), drift EMA and per-slot statistics, which in PyTorch ops is about 25 kernels a
bank, each a few microseconds of GPU time and tens of host time on a CPU-bound step.

One program per slot (a row of the bank's flat (capacity, P) parameter): a first pass over the
row sums the squared (unscaled) gradient, which decides whether the slot steps (trainable and
finite); a second pass updates the parameters and the Adam and EMA state in place and sums the
drift norms. Same formulas as the PyTorch form (`bank.py`), so the two agree to float32
rounding (the bias corrections are exp(step * ln beta) here, pow there).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import fast

_BLOCK = 256


@triton.jit
def _seed_step_kernel(p_ptr, g_ptr, m_ptr, v_ptr, ema_ptr, step_ptr, trainable_ptr, scale_ptr,
                      norm_ptr, finite_ptr, drift_ptr, running_ptr, lr_ptr, P, lr, b1, b2, ln_b1,
                      ln_b2, eps, wd, drift_w, HAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_LR: tl.constexpr, OVERFLOW_OK: tl.constexpr, INTO: tl.constexpr,
                      BLOCK: tl.constexpr):
    slot = tl.program_id(0)
    row = slot.to(tl.int64) * P
    scale = tl.load(scale_ptr + slot) if HAS_SCALE else 1.0
    if HAS_LR:  # the slot's own rate; 0: the scalar (KasminaConfig.seed_lr)
        own = tl.load(lr_ptr + slot)
        lr = tl.where(own > 0.0, own, lr)
    sq = tl.zeros((BLOCK,), tl.float32)
    if HAS_GRAD:
        for start in range(0, P, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            g = tl.load(g_ptr + row + cols, mask=cols < P, other=0.0) / scale
            sq += g * g
    total = tl.sum(sq, axis=0)
    finite = (total == total) & (total != float("inf"))  # a sum of squares: not NaN nor +inf
    update = (tl.load(trainable_ptr + slot) != 0) & finite
    steps = tl.load(step_ptr + slot) + update.to(tl.float32)
    tl.store(step_ptr + slot, steps)
    t = tl.maximum(steps, 1.0)
    bc1 = 1.0 - tl.exp(t * ln_b1)
    bc2 = 1.0 - tl.exp(t * ln_b2)
    d2 = tl.zeros((BLOCK,), tl.float32)
    e2 = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, P, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < P
        p = tl.load(p_ptr + row + cols, mask=mask, other=0.0)
        ema = tl.load(ema_ptr + row + cols, mask=mask, other=0.0)
        if update:
            if HAS_GRAD:
                g = tl.load(g_ptr + row + cols, mask=mask, other=0.0) / scale
            else:
                g = tl.zeros((BLOCK,), tl.float32)
            m = tl.load(m_ptr + row + cols, mask=mask, other=0.0)
            v = tl.load(v_ptr + row + cols, mask=mask, other=0.0)
            m = m + (1.0 - b1) * (g - m)
            v = v * b2 + g * g * (1.0 - b2)
            delta = (m / bc1) / (tl.sqrt(v / bc2) + eps) + wd * p
            p = p - lr * delta
            ema = ema + drift_w * (p - ema)
            tl.store(m_ptr + row + cols, m, mask=mask)
            tl.store(v_ptr + row + cols, v, mask=mask)
            tl.store(p_ptr + row + cols, p, mask=mask)
            tl.store(ema_ptr + row + cols, ema, mask=mask)
        d2 += (p - ema) * (p - ema)
        e2 += ema * ema
    if OVERFLOW_OK:  # a GradScaler overflow skips the slot's step and reads as finite
        tl.store(norm_ptr + slot, tl.where(finite, tl.sqrt(total), 0.0))
        if not INTO:
            tl.store(finite_ptr + slot, 1)
    else:
        tl.store(norm_ptr + slot, tl.sqrt(total))
        if INTO:  # the layer's flag: a running slot with a non-finite gradient stays flagged
            bad = (tl.load(running_ptr + slot) != 0) & (finite == 0)
            tl.store(finite_ptr + slot, (tl.load(finite_ptr + slot) != 0) | bad)
        else:
            tl.store(finite_ptr + slot, finite.to(tl.int8))
    tl.store(drift_ptr + slot, tl.sqrt(tl.sum(d2, axis=0))
             / tl.maximum(tl.sqrt(tl.sum(e2, axis=0)), 1e-12))


def seed_step(flat: torch.Tensor, grad: torch.Tensor | None, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, ema: torch.Tensor, opt_step: torch.Tensor,
              trainable: torch.Tensor, grad_scale: torch.Tensor | None, lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float, drift_ema: float,
              overflow_ok: bool, into: tuple[torch.Tensor, ...] | None = None,
              slot_lr: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """In place on flat, exp_avg, exp_avg_sq, ema and opt_step; returns per-slot (grad_norm,
    grad_finite, drift). With `into` = (grad_norm, drift, nonfinite, running), the layer's
    (capacity,) lane views, it writes the first two there, flags nonfinite where a running
    slot's gradient is not finite (unless `overflow_ok`) and returns None: one launch where
    the returning form takes four more (casts and the layer's copies), each tens of
    microseconds of host time on a host-bound step. `slot_lr` (capacity,) float32: each slot's
    learning rate, `lr` where it is 0 (read in the same launch)."""
    slots, size = flat.shape
    if into is None:
        norm = torch.empty(slots, device=flat.device, dtype=torch.float32)
        finite = torch.empty(slots, device=flat.device, dtype=torch.int8)
        drift, running = torch.empty_like(norm), finite
    else:
        norm, drift, nonfinite, running = into
        assert norm.is_contiguous() and drift.is_contiguous() and nonfinite.is_contiguous()
        finite, running = nonfinite.view(torch.uint8), running.view(torch.uint8)
    b1, b2 = betas
    fast(_seed_step_kernel)[(slots,)](
        flat, flat if grad is None else grad.contiguous(), exp_avg, exp_avg_sq, ema, opt_step,
        trainable.view(torch.uint8), flat if grad_scale is None else grad_scale.float(),
        norm, finite, drift, running, flat if slot_lr is None else slot_lr.contiguous(), size,
        lr, b1, b2,
        math.log(b1) if b1 > 0 else -math.inf, math.log(b2) if b2 > 0 else -math.inf, eps,
        weight_decay, 1.0 - drift_ema, HAS_GRAD=grad is not None,
        HAS_SCALE=grad_scale is not None, HAS_LR=slot_lr is not None,
        OVERFLOW_OK=overflow_ok, INTO=into is not None,
        BLOCK=_BLOCK, num_warps=4)
    return None if into is not None else (norm, finite.bool(), drift)
