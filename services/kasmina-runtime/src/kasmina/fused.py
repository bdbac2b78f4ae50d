"""A growing layer over a plain `nn.Linear` host as one autograd node: the host's GEMM, then the
running seeds' blueprints blended into its output in place (`KasminaLayer`'s path on CUDA
wherever `applies`; the general path of `layer.py` elsewhere, with the same results).

Why (measured on an H200, bf16, 4096 x 32768, 102 of 1,024 seeds growing; benchmarks/NOTES.md,
"The training step"): the general path gathers the running chunks into an (A, N, C) float32
copy, writes a blended copy of all of h (400 us a step) and in backward a scaled copy of all of
the output gradient (211 us), for chunks of 4 features, a tenth of them running. Here:
- forward: h = x W^T + b; each running bank's kernel reads its chunks from h, runs the
  residual_mlp and writes the blend into h itself (`kernels/triton_mlp.py` `seed_forward`),
  keeping the chunks as they were for the backward: only the running chunks' bytes move. F.linear
  saves x, not h, so writing h is safe (autograd's version counters would say otherwise).
- backward: on a blended feature the host's gradient is g (1 - alpha). Instead of scaling g (a
  copy of the activation), the scaling D = diag(1 - alpha) goes on the weight-sized side:
  dx = g (D W), dW = D (g^T x), db = D sum(g). The blueprints' gradients come from one kernel a
  bank reading g's running columns (`seed_backward`).

It applies (`applies`) where every running lane is a fused residual_mlp lane that does not
pass the host's gradient through its blueprint (no FOSSILIZED seed, `isolate_host_in_blend`),
with the Triton kernels on CUDA (or the interpreter), not under torch.compile (which traces the
general path: every lane runs), and on a host that is exactly `nn.Linear` with no hooks (this
node calls F.linear itself). A lane whose output is not finite this step blends nowhere its
output is not finite, is marked (`lane_nonfinite`) and blends nowhere from the next step, as on
the general path (which blends none of it this step); its host gradient is g.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.modules import module as _module

from .kernels import interpreting

if TYPE_CHECKING:
    from .layer import KasminaLayer


def host_ok(host: nn.Module) -> bool:
    """A host this node may compute with F.linear: exactly nn.Linear, no hooks anywhere."""
    return (type(host) is nn.Linear and not host._forward_hooks
            and not host._forward_pre_hooks and not _module._global_forward_hooks
            and not _module._global_forward_pre_hooks)


def applies(layer: KasminaLayer, x: torch.Tensor) -> bool:
    return (layer._flags.fused and not torch.compiler.is_compiling() and x.numel() > 0
            and (x.is_cuda or interpreting()) and layer._triton and host_ok(layer.host))


def forward(layer: KasminaLayer, x: torch.Tensor, tracking: bool) -> torch.Tensor:
    host = layer.host
    x2 = x.reshape(-1, x.shape[-1])
    keys = layer._flags.banks
    # (the reconstruction loss is decided here: autograd runs the node's forward without grad)
    recon = layer.training and torch.is_grad_enabled() and layer._flags.has_train
    out = _FusedLinear.apply(x2, host.weight, host.bias, layer, (tracking, recon, keys),
                             *(layer.banks[k].flat for k in keys))
    return out.view(*x.shape[:-1], out.shape[-1])


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, layer, mode, *flats):  # noqa: ANN001, ANN205
        tracking, recon, keys = mode
        h = F.linear(x, weight, bias)
        if tracking:  # the host's output as it was: the telemetry reads it before the blend
            layer.telemetry.observe(h, layer.config.dead_threshold, True)
        save = any(ctx.needs_input_grad[5:])
        n = h.shape[0]
        with torch.no_grad():
            alpha = torch.where(layer.lane_nonfinite, 0.0,
                                layer.alpha.index_select(0, layer.lane_index) * layer.lane_blend)
            sums = torch.zeros(layer.num_lanes, 3, device=h.device)
            kept = []
            for key, flat in zip(keys, flats, strict=True):
                bank = layer.banks[key]
                start, end = layer.table.lanes[int(key)]
                k, part = _kernels().seed_forward(h, flat, bank.chunk, bank.spec.hidden,
                                                  layer.bounds, alpha, start, save)
                sums[start:end] = part
                kept.append(k)
            sse, sx, sxx = sums.unbind(1)
            bad = layer.lane_nonfinite | (layer.lane_running & ~torch.isfinite(sse))
            layer.lane_nonfinite.copy_(bad)
            ok = ~bad
            coef = None
            if recon:
                elems = layer.lane_sizes * n
                train = layer._track_reconstruction(sse / elems, sx / elems, sxx / elems, ok)
                coef = torch.where(train, 2.0 / elems, 0.0)
        ctx.layer, ctx.keys, ctx.blend = layer, keys, layer._flags.has_blend
        if save:
            ctx.save_for_backward(x, weight, torch.where(ok, alpha, 0.0),
                                  torch.zeros_like(alpha) if coef is None else coef, *flats,
                                  *kept)
        else:
            ctx.save_for_backward(x, weight)
        return h

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):  # noqa: ANN001, ANN205
        layer, needs = ctx.layer, ctx.needs_input_grad
        x, weight, *rest = ctx.saved_tensors
        g = g if g.stride(1) == 1 else g.contiguous()
        scale = None
        if ctx.blend and rest:  # D: 1 - alpha on the blended features, 1 elsewhere
            run = layer.run_of.long()
            scale = torch.where(run >= 0, 1.0 - rest[0].index_select(0, run.clamp(min=0)), 1.0)
        gx = gw = gb = None
        if needs[0]:
            w = weight if scale is None else (weight.float() * scale[:, None]).to(weight.dtype)
            gx = g.mm(w)
        if needs[1]:
            gw = g.t().mm(x)
            if scale is not None:
                gw.mul_(scale[:, None])
        if needs[2]:
            gb = g.sum(0)
            if scale is not None:
                gb.mul_(scale)
        flats = [None] * len(ctx.keys)
        if rest:
            alpha, coef, *banks = rest
            params, kept = banks[:len(flats)], banks[len(flats):]
            for i, key in enumerate(ctx.keys):
                if needs[5 + i]:
                    start, _ = layer.table.lanes[int(key)]
                    flats[i] = _kernels().seed_backward(kept[i], g, params[i],
                                                        layer.banks[key].spec.hidden,
                                                        layer.bounds, alpha, coef, start)
        return gx, gw, gb, None, None, *flats


def _kernels():  # noqa: ANN202
    from .kernels import triton_mlp
    return triton_mlp
