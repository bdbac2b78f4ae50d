"""The chunked layer's fused pass as `torch.library` custom ops (fake + autograd registered, so
`torch.compile` traces through them), and the switch between Triton and the PyTorch reference.

- `kasmina::column_stats(h, dead_threshold) -> (3, F)`: telemetry of a layer with no running
  seed (a read-only pass).
- `kasmina::chunk_blend(h, y, alpha, run_of, bounds, track, dead_threshold, align)
  -> (out, stats)`: the blend of running seeds' outputs into the host output, with the
  telemetry of h in the same pass when `track` (stats is (0, F) otherwise). `align` is a
  power of two dividing every running chunk's start and width (ForwardPlan.align), declared
  to the two-pass kernel so its loads on the running chunks vectorise.

- `kasmina::chunk_blend_backward(grad_out, alpha, run_of, bounds, width)
  -> (grad_h, grad_y)`: chunk_blend's backward (registered as its autograd formula), one pass
  over the gradient: the host's gradient is exactly `grad * (1 - alpha)` on running features
  and exactly `grad` elsewhere; y's is `grad * alpha`.

On CUDA the ops run the Triton kernels; on the CPU they run the Triton interpreter when
TRITON_INTERPRET=1 (tests), else the reference.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import reference


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(kernels: str, device: torch.device) -> bool:
    """`kernels` is KasminaConfig.kernels: "auto" (Triton on CUDA), "triton" or "torch"."""
    if kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")
    if kernels == "auto":
        return device.type == "cuda"
    # "triton" off CUDA runs the custom ops' CPU implementation: the interpreted kernels under
    # TRITON_INTERPRET=1, the reference otherwise.
    return kernels == "triton"


@torch.library.custom_op("kasmina::column_stats", mutates_args=())
def _column_stats(h: Tensor, dead_threshold: float) -> Tensor:
    if _interpreting():
        from . import triton_blend
        return triton_blend.column_stats(h, dead_threshold)
    return reference.column_stats(h, dead_threshold)


@_column_stats.register_kernel("cuda")
def _column_stats_cuda(h: Tensor, dead_threshold: float) -> Tensor:
    from . import triton_blend
    return triton_blend.column_stats(h, dead_threshold)


@_column_stats.register_fake
def _column_stats_fake(h: Tensor, dead_threshold: float) -> Tensor:
    return h.new_empty(3, h.shape[1], dtype=torch.float32)


@torch.library.custom_op("kasmina::chunk_blend", mutates_args=())
def _chunk_blend(h: Tensor, y: Tensor, alpha: Tensor, run_of: Tensor,
                 bounds: Tensor, track: bool, dead_threshold: float, align: int
                 ) -> tuple[Tensor, Tensor]:
    if _interpreting():
        from . import triton_blend
        return triton_blend.chunk_blend(h, y, alpha, run_of, bounds, track, dead_threshold,
                                        align)
    stats = (reference.column_stats(h, dead_threshold) if track
             else h.new_zeros(0, h.shape[1], dtype=torch.float32))
    return reference.chunk_blend(h, y, alpha, run_of, bounds), stats


@_chunk_blend.register_kernel("cuda")
def _chunk_blend_cuda(h: Tensor, y: Tensor, alpha: Tensor, run_of: Tensor,
                      bounds: Tensor, track: bool, dead_threshold: float, align: int
                      ) -> tuple[Tensor, Tensor]:
    from . import triton_blend
    return triton_blend.chunk_blend(h, y, alpha, run_of, bounds, track, dead_threshold,
                                        align)


@_chunk_blend.register_fake
def _chunk_blend_fake(h, y, alpha, run_of, bounds, track, dead_threshold,  # noqa: ANN001
                      align):
    return torch.empty_like(h), h.new_empty(3 if track else 0, h.shape[1], dtype=torch.float32)


def _blend_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    _, y, alpha, run_of, bounds, _, _, _ = inputs
    ctx.save_for_backward(alpha, run_of, bounds)
    ctx.mark_non_differentiable(output[1])  # the telemetry
    ctx.width = y.shape[2]


def _blend_backward(ctx, grad_out: Tensor, _grad_stats: Tensor):  # noqa: ANN202
    alpha, run_of, bounds = ctx.saved_tensors
    grad_h, grad_y = torch.ops.kasmina.chunk_blend_backward(grad_out, alpha, run_of,
                                                            bounds, ctx.width)
    return grad_h, grad_y, None, None, None, None, None, None


@torch.library.custom_op("kasmina::chunk_blend_backward", mutates_args=())
def _chunk_blend_backward(grad_out: Tensor, alpha: Tensor, run_of: Tensor,
                          bounds: Tensor, width: int) -> tuple[Tensor, Tensor]:
    if _interpreting():
        from . import triton_blend
        return triton_blend.chunk_blend_backward(grad_out, alpha, run_of, bounds, width)
    return reference.chunk_blend_backward(grad_out, alpha, run_of, bounds, width)


@_chunk_blend_backward.register_kernel("cuda")
def _chunk_blend_backward_cuda(grad_out: Tensor, alpha: Tensor, run_of: Tensor,
                               bounds: Tensor, width: int) -> tuple[Tensor, Tensor]:
    from . import triton_blend
    return triton_blend.chunk_blend_backward(grad_out, alpha, run_of, bounds, width)


@_chunk_blend_backward.register_fake
def _chunk_blend_backward_fake(grad_out, alpha, run_of, bounds, width):  # noqa: ANN001
    return (torch.empty_like(grad_out, memory_format=torch.contiguous_format),
            grad_out.new_empty(alpha.shape[0], grad_out.shape[0], width, dtype=torch.float32))


torch.library.register_autograd("kasmina::chunk_blend", _blend_backward,
                                setup_context=_blend_setup)


def column_stats(h: Tensor, dead_threshold: float, triton: bool) -> Tensor:
    if not triton:
        return reference.column_stats(h, dead_threshold)
    if torch.compiler.is_compiling() or h.device.type != "cuda":
        return torch.ops.kasmina.column_stats(h, dead_threshold)
    # Eager CUDA: the launcher directly. Measured on an H200 at 1024 x 8192 bf16: 57 us per
    # call through the torch.library dispatcher vs 20 us direct, for 14 us of GPU time
    # (benchmarks/results/probe_overhead_h200_2026-11-27_v2.log). Same function either way.
    from . import triton_blend
    return triton_blend.column_stats(h, dead_threshold)


def chunk_blend(h: Tensor, y: Tensor, alpha: Tensor, run_of: Tensor, bounds: Tensor,
                track: bool, dead_threshold: float, align: int, triton: bool
                ) -> tuple[Tensor, Tensor | None]:
    """(out, stats or None). The reference path is differentiable as it stands."""
    if triton:
        out, stats = torch.ops.kasmina.chunk_blend(h, y, alpha, run_of, bounds, track,
                                                   dead_threshold, align)
        return out, stats if track else None
    out = reference.chunk_blend(h, y, alpha, run_of, bounds)
    return out, reference.column_stats(h.detach(), dead_threshold) if track else None
