"""What a seed layer needs from its host: its chunks, its feature counts, and the pieces that
keep the host's own callers and gradients as they were."""

from __future__ import annotations

import sys

import torch
from torch import nn


def split_chunks(features: int, num_seeds: int) -> list[tuple[int, int]]:
    """Contiguous (start, end) bounds; the first `features % num_seeds` chunks are one wider."""
    if not 1 <= num_seeds <= features:
        raise ValueError(f"num_seeds must be in [1, {features}] for {features} features, "
                         f"got {num_seeds}")
    base, extra = divmod(features, num_seeds)
    bounds, start = [], 0
    for i in range(num_seeds):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def conv1d_type() -> type[nn.Module] | None:
    """transformers' Conv1D (GPT-2's transposed linear) if transformers is loaded. A model that
    holds one has imported `transformers.pytorch_utils`, so this finds every Conv1D there is
    without importing transformers."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def host_features(host: nn.Module) -> tuple[int, int]:
    """(in, out) features of a host a seed layer can wrap: `nn.Linear`, or Hugging Face's
    `Conv1D` (a linear layer with its weight stored transposed, (in, out))."""
    if isinstance(host, nn.Linear):
        return host.in_features, host.out_features
    if type(host).__name__ == "Conv1D" and hasattr(host, "nf"):
        return int(host.weight.shape[0]), int(host.nf)
    raise TypeError(f"KasminaLayer wraps nn.Linear or transformers' Conv1D, got "
                    f"{type(host).__name__}")


def no_fused_fast_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing. torch's fused inference paths
    (`TransformerEncoderLayer`'s) read their linears' weights directly, which would bypass the
    seeds; they check for hooks on their sub-modules and take the plain path when one exists."""


def hook_in_eval(module: nn.Module, training: bool) -> None:
    """`no_fused_fast_path` on the module exactly while it is in eval mode (a seed layer's
    `train`): those paths never run in training mode, where a hook cost every call ~3 us of
    host time, 10 % of a dormant layer's step on a small CPU-bound layer (NOTES, s9)."""
    hooks = module._forward_pre_hooks
    ours = [k for k, hook in hooks.items() if hook is no_fused_fast_path]
    for k in ours if training else ():
        del hooks[k]
    if not training and not ours:
        module.register_forward_pre_hook(no_fused_fast_path)


class AttachLoss(torch.autograd.Function):
    """Identity on `out`; in backward also seeds the gradient of `loss` with 1, so the
    blueprints' reconstruction loss is differentiated in the same backward as the task loss
    (its graph starts from detached inputs: the host's gradients are untouched)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.loss_dtype, ctx.loss_device = loss.dtype, loss.device
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)


class ShadowGradient(torch.autograd.Function):
    """`out` itself in forward (no arithmetic touches it: bit for bit, -0.0 and all); in
    backward the output's gradient g goes to `out` unchanged and, gathered onto the lanes and
    scaled by each lane's share, to the blueprints' outputs y: out = h + share * (y - y.detach())
    on each lane's chunk (KasminaConfig.training_task_share), the host's gradients untouched."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, y: torch.Tensor, share: torch.Tensor,  # noqa: ANN001
                gather: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # y (L, N, W) float32; share (L,); gather (L * W,) host feature of each chunk position;
        # valid (L, 1, W) 1 on a running lane's real features
        ctx.save_for_backward(share, gather, valid)
        ctx.lanes_shape = y.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        share, gather, valid = ctx.saved_tensors
        lanes, n, width = ctx.lanes_shape
        g = grad.reshape(-1, grad.shape[-1]).float()  # (N, F)
        grad_y = g.index_select(1, gather).view(n, lanes, width).transpose(0, 1)  # (L, N, W)
        return grad, grad_y * (valid * share.view(-1, 1, 1)), None, None, None
