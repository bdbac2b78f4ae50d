"""PyTorch reference for the chunked layer's fused pass: differentiable, any device.

Inputs shared with the Triton kernels (see `ops.py`):
- h (N, F): the host layer's output, any float dtype.
- y (A, N, C) float32: blueprint outputs of the A running seeds (C = padded chunk width).
- alpha (A,) float32: effective blend weight per running seed (0 = the host's output exactly).
- feat (M,) int64: host features of the running seeds; run_of (F,) int32: per host feature,
  its running seed index (-1: none); bounds (A, 2) int32: each running chunk's first host
  feature and width.
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


def chunk_blend(h: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, feat: torch.Tensor,
                run_of: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """out = h, except on running seeds' features: (1 - alpha) * h + alpha * y, and exactly h
    where alpha == 0 (TRAINING seeds, seeds switched off, non-finite seeds)."""
    run, pos = positions(feat, run_of, bounds)
    hv = h.index_select(1, feat).float()  # (N, M)
    yv = y.permute(1, 0, 2)[:, run, pos]  # (N, M)
    a = alpha[run]  # (M,)
    blended = torch.where(a == 0, hv, (1 - a) * hv + a * yv)
    return h.index_copy(1, feat, blended.to(h.dtype))


def positions(feat: torch.Tensor, run_of: torch.Tensor, bounds: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) running seed index and position in its chunk of each of `feat`'s host features."""
    run = run_of[feat].long()
    return run, feat - bounds[run, 0].long()


def chunk_blend_backward(grad_out: torch.Tensor, alpha: torch.Tensor, feat: torch.Tensor,
                         run_of: torch.Tensor, bounds: torch.Tensor, width: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `chunk_blend` for h (grad * (1 - alpha) on running features, grad
    elsewhere) and for y ((A, N, width) float32: grad * alpha; 0 on padding)."""
    run, pos = positions(feat, run_of, bounds)  # (M,)
    a = alpha[run]  # (M,)
    g = grad_out.index_select(1, feat).float()  # (N, M)
    grad_h = grad_out.index_copy(1, feat, (g * (1 - a)).to(grad_out.dtype))
    grad_y = grad_out.new_zeros(alpha.shape[0], grad_out.shape[0], width, dtype=torch.float32)
    grad_y.permute(1, 0, 2)[:, run, pos] = g * a
    return grad_h, grad_y
