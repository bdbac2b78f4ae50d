"""A growing layer over a plain `nn.Linear` (or transformers' `Conv1D`) host as one autograd
node: the host's GEMM, then the running seeds' blueprints blended into its output in place
(`KasminaLayer`'s path on CUDA wherever `applies`; the general path of `layer.py` elsewhere,
with the same results).

Why (measured on an H200, bf16, 4096 x 32768, 102 of 1,024 seeds growing; benchmarks/NOTES.md,
"The training step"): the general path gathers the running chunks into an (A, N, C) float32
copy, writes a blended copy of all of h (400 us a step) and in backward a scaled copy of all of
the output gradient (211 us), for chunks of 4 features, a tenth of them running. Here:
- forward: h = x W^T + b; each running bank's kernel reads its chunks from h, runs the
  residual_mlp and writes the blend into h itself (`kernels/triton_mlp.py` `seed_forward`),
  keeping the chunks as they were for the backward: only the running chunks' bytes move. The
  node's own backward needs x, not h, so writing h is safe.
- backward: on a blended feature the host's gradient is g (1 - alpha). Instead of scaling g (a
  copy of the activation), the scaling D = diag(1 - alpha) goes on the weight-sized side:
  dx = g (D W), dW = D (g^T x), db = D sum(g). The blueprints' gradients come from one kernel a
  bank reading g's running columns (`seed_backward`).

It applies (`applies`) where every running lane is a residual_mlp lane of a narrow bank
(`kernels.seed_node_fits`: up to 4 features a chunk at the catalog's 16 hidden units) that does
not pass the host's gradient through its blueprint (no FOSSILIZED seed, `isolate_host_in_blend`),
with the Triton kernels on CUDA (or the interpreter), not under torch.compile (which traces the
general path: every lane runs), and on a host that is exactly `nn.Linear` or `Conv1D` with no
hooks (this node computes the host itself). A lane whose output is not finite this step blends
nowhere its output is not finite, is marked (`lane_nonfinite`) and blends nowhere from the next
step, as on the general path (which blends none of it this step); its host gradient is g.

Measured (H200, s9c, bf16, 1,024 seeds): the growing step at 4096 x 32768 is 1.120x (grafting)
and 1.108x (training) the bare host's (grafting 1.191x in another run, s9d), the general
path's 1.33x in the same run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.modules import module as _module

from .host import conv1d_type
from .kernels import interpreting

if TYPE_CHECKING:
    from .layer import KasminaLayer


def host_ok(host: nn.Module) -> bool:
    """Exactly nn.Linear or transformers' Conv1D (its weight (in, out)), with no hooks
    anywhere: a host this node may compute itself."""
    if (host._forward_hooks or host._forward_pre_hooks or _module._global_forward_hooks
            or _module._global_forward_pre_hooks):
        return False
    return type(host) is nn.Linear or type(host) is conv1d_type()


def applies(layer: KasminaLayer, x: torch.Tensor) -> bool:
    return (layer._flags.fused and not torch.compiler.is_compiling() and x.numel() > 0
            and (x.is_cuda or interpreting()) and layer._triton
            and host_ok(layer.host))


def forward(layer: KasminaLayer, x: torch.Tensor, tracking: bool) -> torch.Tensor:
    host = layer.host
    x2 = x.reshape(-1, x.shape[-1])
    keys = layer._flags.banks
    # (the reconstruction loss is decided here: autograd runs the node's forward without grad)
    recon = layer.training and torch.is_grad_enabled() and layer._flags.has_train
    mode = (tracking, recon, keys, type(host) is not nn.Linear)  # (applies: else a Conv1D)
    out = _FusedLinear.apply(x2, host.weight, host.bias, layer, mode,
                             *(layer.banks[k].flat for k in keys))
    return out.view(*x.shape[:-1], out.shape[-1])


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, mode, *flats):  # noqa: ANN001, ANN205
        tracking, recon, keys, transposed = mode
        if not transposed:
            h = F.linear(x, weight, bias)
        else:  # as Conv1D.forward
            h = x.mm(weight) if bias is None else torch.addmm(bias, x, weight)
        if tracking:  # the host's output as it was: the telemetry reads it before the blend
            layer.telemetry.observe(h, layer.config.dead_threshold, True)
        save = any(ctx.needs_input_grad[5:])  # the blueprints' gradients: keep their inputs
        used = torch.empty(layer.num_lanes, device=h.device)  # the alpha each lane blended with
        coef = torch.empty(layer.num_lanes, device=h.device)  # its reconstruction loss's 2 / n
        tensors = {name: getattr(layer, name) for name in _LANES}
        tensors["alpha"] = layer.alpha
        kept = []  # per bank: its chunks as they were, and with recon their y - x
        for key, flat in zip(keys, flats, strict=True):
            bank = layer.banks[key]
            start, _ = layer.table.lanes[int(key)]
            kept.extend(_kernels().seed_forward(h, flat, bank.chunk, bank.spec.hidden, tensors,
                                                start, save, recon, used, coef,
                                                layer._align))
        ctx.layer, ctx.keys, ctx.blend, ctx.recon = layer, keys, layer._flags.has_blend, recon
        ctx.transposed, ctx.save = transposed, save
        x = x.to(h.dtype)  # what the GEMM read (autocast's copy; x itself otherwise)
        # The lanes as this forward read them (a commit before the backward is then autograd's
        # in-place error, as on the general path, not a gradient of other lanes); the host's
        # gradient needs them whether or not the blueprints' are wanted.
        ctx.save_for_backward(x, weight, layer.run_of, layer.bounds, used, coef, *flats,
                              *(kept if save else ()))
        return h

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        layer, needs = ctx.layer, ctx.needs_input_grad
        x, weight, run_of, bounds, alpha, coef, *banks = ctx.saved_tensors
        g = g if g.stride(1) == 1 else g.contiguous()
        # D: 1 - alpha on the blended features, 1 elsewhere
        scale = _kernels().feature_scale(run_of, alpha) if ctx.blend else None
        gx = gw = gb = None
        cd = g.dtype  # the GEMMs' dtype (autocast's, or the host's), whatever the weight's
        rows = not ctx.transposed  # nn.Linear's weight is (out, in): D scales its rows
        if needs[0]:  # D W: one rounding of the product
            w = weight.to(cd) if scale is None else _kernels().feature_mul(
                weight, scale, rows, torch.empty(weight.shape, dtype=cd, device=weight.device))
            gx = g.mm(w.t() if ctx.transposed else w)
        if needs[1]:
            gw = x.t().mm(g) if ctx.transposed else g.t().mm(x)
            if scale is not None:
                _kernels().feature_mul(gw, scale, rows, out=gw)
        if needs[2]:
            gb = g.sum(0)
            if scale is not None:
                gb.mul_(scale)
        flats = [None] * len(ctx.keys)
        params, kept = banks[:len(flats)], banks[len(flats):]
        for i, key in enumerate(ctx.keys):
            if ctx.save and needs[5 + i]:
                start, _ = layer.table.lanes[int(key)]
                flats[i] = _kernels().seed_backward(*kept[2 * i:2 * i + 2], g, params[i],
                                                    layer.banks[key].spec.hidden, bounds,
                                                    alpha, coef, start, ctx.recon,
                                                    layer._align)
        return gx, gw, gb, None, None, *flats


# the lane tensors the kernels read and write (kasmina.lanes, layer.py's lane statistics)
_LANES = ("bounds", "lane_index", "lane_blend", "lane_nonfinite", "lane_running", "lane_train",
          "lane_sizes", "lane_recon")


def _kernels():  # noqa: ANN202
    from .kernels import triton_mlp
    return triton_mlp
