"""PyTorch reference for the chunked layer's fused pass: differentiable, any device.

Inputs shared with the Triton kernels (see `ops.py`):
- h (N, F): the host layer's output, any float dtype.
- y (A, N, C) float32: blueprint outputs of the A running seeds (C = padded chunk width).
- alpha (A,) float32: effective blend weight per running seed (0 = the host's output exactly).
- run_of (F,) int32: per host feature, its running lane (-1: none); bounds (A, 2) int32:
  each running lane's first host feature and width (0, 0 for lanes that do not run).
"""

from __future__ import annotations

import torch


def column_stats(h: torch.Tensor, dead_threshold: float) -> torch.Tensor:
    """(3, F) float32: per feature the sum, sum of squares and count of |h| < dead_threshold."""
    hf = h if h.dtype == torch.float32 else h.float()
    # Measured on 2 EPYC cores, 2048 x 1024: (h*h).sum(0) 2.4 ms vs vector_norm(dim=0) 28 ms;
    # count_nonzero(dim=0) 6 ms vs a bool .sum(0) 40 ms.
    dead = torch.count_nonzero(hf.abs() < dead_threshold, dim=0).float()
    return torch.stack([hf.sum(0), (hf * hf).sum(0), dead])


def chunk_blend(h: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, run_of: torch.Tensor,
                bounds: torch.Tensor) -> torch.Tensor:
    """out = h, except on running lanes' features: (1 - alpha) * h + alpha * y, and exactly h
    where alpha == 0 (TRAINING seeds, seeds switched off, non-finite seeds). Every shape is
    fixed by the layer (L lanes, F features), whatever the number of running seeds."""
    run, pos, a = _per_feature(alpha, run_of, bounds, y.shape[2])  # (F,)
    hf = h.float()
    yv = y.permute(1, 0, 2)[:, run, pos]  # (N, F)
    return torch.where(a == 0, h, ((1 - a) * hf + a * yv).to(h.dtype))


def _per_feature(alpha: torch.Tensor, run_of: torch.Tensor, bounds: torch.Tensor, width: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F,) lane, position in its chunk and alpha of each host feature; features off every
    running lane read lane 0, position 0, alpha 0 (fixed shapes, no data-dependent masks)."""
    on = run_of >= 0
    run = run_of.long().clamp(min=0)
    pos = torch.arange(run_of.shape[0], device=run_of.device) - bounds[run, 0].long()
    pos = torch.where(on, pos, 0).clamp(0, width - 1)
    return run, pos, torch.where(on, alpha[run], 0.0)


def chunk_blend_backward(grad_out: torch.Tensor, alpha: torch.Tensor, run_of: torch.Tensor,
                         bounds: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `chunk_blend` for h (grad * (1 - alpha) on running features, grad
    elsewhere) and for y ((L, N, width) float32: grad * alpha; 0 on padding)."""
    run, pos, a = _per_feature(alpha, run_of, bounds, width)
    g = grad_out.float()
    grad_h = torch.where(a == 0, grad_out, (g * (1 - a)).to(grad_out.dtype))
    n, lanes = grad_out.shape[0], alpha.shape[0]
    # Features off every running lane add into one spare column, dropped after.
    into = torch.where(run_of >= 0, run * width + pos, lanes * width)
    grad_y = grad_out.new_zeros(n, lanes * width + 1, dtype=torch.float32)
    grad_y.index_add_(1, into, g * a)
    return grad_h, grad_y[:, :-1].reshape(n, lanes, width).permute(1, 0, 2).contiguous()
