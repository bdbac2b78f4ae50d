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


def interpreting() -> bool:
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
    if interpreting():
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
    if interpreting():
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
    if interpreting():
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


class _ChunkBlend(torch.autograd.Function):
    """Eager CUDA: the custom op's launchers and autograd formula without the dispatcher.
    Measured on an H200, 1024 x 8192 bf16, 102 of 1,024 seeds grafting: the op's generated
    autograd node and its backward op took ~520 us of host time a step, on a step bound by
    the host (benchmarks/results/probe_step_h200_2026-12-01_s5a.log)."""

    @staticmethod
    def forward(ctx, h, y, alpha, run_of, bounds, track, dead_threshold, align):  # noqa: ANN001
        from . import triton_blend
        out, stats = triton_blend.chunk_blend(h, y, alpha, run_of, bounds, track,
                                              dead_threshold, align)
        _blend_setup(ctx, (h, y, alpha, run_of, bounds, track, dead_threshold, align),
                     (out, stats))
        return out, stats

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_stats: Tensor):  # noqa: ANN205
        from . import triton_blend
        alpha, run_of, bounds = ctx.saved_tensors
        grad_h, grad_y = triton_blend.chunk_blend_backward(grad_out, alpha, run_of, bounds,
                                                           ctx.width)
        return grad_h, grad_y, None, None, None, None, None, None


def chunk_blend(h: Tensor, y: Tensor, alpha: Tensor, run_of: Tensor, bounds: Tensor,
                track: bool, dead_threshold: float, align: int, triton: bool
                ) -> tuple[Tensor, Tensor | None]:
    """(out, stats or None). The reference path is differentiable as it stands."""
    if triton and (h.device.type == "cuda" or interpreting()) and not (
            torch.compiler.is_compiling()):
        out, stats = _ChunkBlend.apply(h, y, alpha, run_of, bounds, track, dead_threshold,
                                       align)
        return out, stats if track else None
    if triton:
        out, stats = torch.ops.kasmina.chunk_blend(h, y, alpha, run_of, bounds, track,
                                                   dead_threshold, align)
        return out, stats if track else None
    out = reference.chunk_blend(h, y, alpha, run_of, bounds)
    return out, reference.column_stats(h.detach(), dead_threshold) if track else None


# ------------------------------------------------------------------ residual_mlp, fused
@torch.library.custom_op("kasmina::residual_mlp", mutates_args=())
def _residual_mlp(x: Tensor, flat: Tensor, hidden: int) -> Tensor:
    from . import triton_mlp
    return triton_mlp.forward(x, flat, hidden)


@_residual_mlp.register_fake
def _residual_mlp_fake(x, flat, hidden):  # noqa: ANN001
    return torch.empty_like(x)


@torch.library.custom_op("kasmina::residual_mlp_backward", mutates_args=())
def _residual_mlp_backward(x: Tensor, flat: Tensor, dy: Tensor, hidden: int,
                           need_dx: bool) -> tuple[Tensor, Tensor]:
    from . import triton_mlp
    dx, dflat = triton_mlp.backward(x, flat, dy, hidden, need_dx)
    return (x.new_empty(0) if dx is None else dx), dflat


@_residual_mlp_backward.register_fake
def _residual_mlp_backward_fake(x, flat, dy, hidden, need_dx):  # noqa: ANN001
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), torch.empty_like(flat)


def _mlp_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, flat, hidden = inputs
    ctx.save_for_backward(x, flat)
    ctx.hidden = hidden


def _mlp_backward(ctx, dy: Tensor):  # noqa: ANN202
    x, flat = ctx.saved_tensors
    dx, dflat = torch.ops.kasmina.residual_mlp_backward(x, flat, dy, ctx.hidden,
                                                        ctx.needs_input_grad[0])
    return (dx if ctx.needs_input_grad[0] else None), dflat, None


torch.library.register_autograd("kasmina::residual_mlp", _mlp_backward, setup_context=_mlp_setup)


class _ResidualMLP(torch.autograd.Function):
    """Eager CUDA: the same launchers without the dispatcher (see `column_stats`)."""

    @staticmethod
    def forward(ctx, x: Tensor, flat: Tensor, hidden: int) -> Tensor:  # noqa: ANN001
        from . import triton_mlp
        ctx.save_for_backward(x, flat)
        ctx.hidden = hidden
        return triton_mlp.forward(x, flat, hidden)

    @staticmethod
    def backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        from . import triton_mlp
        x, flat = ctx.saved_tensors
        dx, dflat = triton_mlp.backward(x, flat, dy, ctx.hidden, ctx.needs_input_grad[0])
        return dx, dflat, None


def fused_mlp_fits(chunk: int, hidden: int) -> bool:
    """Whether the fused residual_mlp takes chunks this wide: the tile kernels' range
    (`wide_mlp`), or for the unrolled columns a padded chunk x hidden of at most 1,024 and
    chunk^2 x hidden of at most 4,096; other banks keep the batched GEMMs.

    The second bound is the compile: the backward unrolls a (chunk, hidden) accumulator
    update per chunk column. Compiled for sm_90 by Triton 3.6 on a 2-core Xeon, backward /
    forward: 4 features 0.8 / 0.7 s, 16 6.4 / 1.3, 32 37.8 / 5.0, 64 293 / 28.6 s
    (the GPU test of 64 features ran past 320 s on the H200 machine,
    benchmarks/results/pytest_gpu_h200_2026-12-03_s12c_kernels.log): a user's first growing
    step would wait minutes."""
    c, h = _pow2(chunk), _pow2(hidden)
    return (c * h <= 1024 and c * c * h <= 4096) or wide_mlp(chunk, hidden)


def wide_mlp(chunk: int, hidden: int) -> bool:
    """Whether the fused residual_mlp runs as `triton_mlp_wide`'s tile kernels (tl.dot; their
    compile does not grow with the chunk): chunks of 9-64 features (padded to 16-64) at up to
    64 hidden units. Narrower chunks keep `triton_mlp`'s unrolled columns."""
    return 16 <= _pow2(chunk) <= 64 and hidden <= 64


def seed_node_fits(chunk: int, hidden: int) -> bool:
    """Whether kasmina.fused's kernels take a residual_mlp bank of this size: up to 148
    parameters a seed (4 features x 16 hidden), the size they were measured and tuned at on a
    GPU (their backward keeps a register accumulator a parameter of a group of 4 hidden units,
    ~120 registers there for sm_90); wider banks keep the general path."""
    return 2 * chunk * hidden + hidden + chunk <= 148


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def residual_mlp(x: Tensor, flat: Tensor, hidden: int) -> Tensor:
    """The fused residual_mlp blueprint (kernels/triton_mlp.py) over every slot of a bank:
    x (A, N, C) float32, flat (A, P) -> (A, N, C). Callers check `fused_mlp_fits` first."""
    x = x.contiguous()
    if torch.compiler.is_compiling() or x.device.type != "cuda":
        return torch.ops.kasmina.residual_mlp(x, flat, hidden)
    return _ResidualMLP.apply(x, flat, hidden)
