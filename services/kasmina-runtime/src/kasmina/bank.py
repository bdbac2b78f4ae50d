"""`BlueprintBank`: the parameters of every seed of one blueprint spec in one layer, slot-major.

The capacity is fixed at construction (so the layer's parameter set never changes); every slot
runs as one batched op (free slots compute on zeros and are masked by the layer). A bank's
parameters are one flat `(capacity, P)` tensor, each named parameter a view of its columns, so
the seeds' own optimizer (a masked Adam with per-slot step counts: a frozen or newly germinated
seed is exact) is one set of elementwise ops over the bank whatever the number of parameters:
measured on an H200 at 1,024 seeds, the step's per-parameter form launched about 60 kernels a
bank, each ~25 us of host time on a CPU-bound step (benchmarks/NOTES.md, "The training step").
The bank keeps float32 master weights whatever the host's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .blueprints import BlueprintSpec, fits_bank, forward_of, init_bounds, uses_fused_mlp
from .config import KasminaConfig

_STATE = ("exp_avg", "exp_avg_sq", "ema")  # optimizer / drift state, the shape of `flat`


class BlueprintBank(nn.Module):
    def __init__(self, spec: BlueprintSpec, chunk: int, capacity: int,
                 device: torch.device) -> None:
        super().__init__()
        self.spec, self.chunk = spec, chunk
        self._shapes = spec.shapes(chunk)
        self._forward = forward_of(spec)  # its activation
        self._fusable = uses_fused_mlp(spec, chunk)
        self._node = self._fusable and kernels.seed_node_fits(chunk, spec.hidden)  # kasmina.fused
        self._columns: dict[str, tuple[int, int]] = {}
        start = 0
        for name, shape in self._shapes.items():
            size = math.prod(shape)
            self._columns[name] = (start, start + size)
            start += size
        self.flat = nn.Parameter(torch.zeros(capacity, start, device=device))
        for k in _STATE:
            self.register_buffer(k, torch.zeros(capacity, start, device=device))
        self.register_buffer("opt_step", torch.zeros(capacity, device=device))
        # uniform(-b, b) initialisation bound of each column, as nn.Linear's
        self.register_buffer("init_bound", init_bounds(spec, spec, chunk).to(device),
                             persistent=False)

    @property
    def capacity(self) -> int:
        return int(self.opt_step.shape[0])

    def view(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named (capacity, *shape) views of a (capacity, P) tensor: parameters, gradients or
        optimizer state."""
        return {n: flat[:, s:e].unflatten(1, self._shapes[n])
                for n, (s, e) in self._columns.items()}

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.view(self.flat)

    @torch.no_grad()
    def init_slot(self, slot: int, seed: int, spec: BlueprintSpec | None = None) -> None:
        """Fresh parameters (uniform ±1/sqrt(fan_in), as nn.Linear) from a generator seeded with
        `seed`, so every rank and every process draws the same ones; empty optimizer state.
        `spec`: the seed's blueprint when it is not the bank's own but fits it (`fits_bank`):
        its own bounds, and 0 past its sizes."""
        bound = self.init_bound.cpu()
        if spec is not None and spec != self.spec:
            assert fits_bank(spec, self.spec), (spec, self.spec)
            bound = init_bounds(self.spec, spec, self.chunk)
        gen = torch.Generator().manual_seed(seed)
        fresh = (torch.rand(self.flat.shape[1], generator=gen) * 2 - 1) * bound
        self.flat[slot] = fresh
        self.exp_avg[slot] = self.exp_avg_sq[slot] = 0.0
        self.ema[slot] = self.flat[slot]
        self.opt_step[slot] = 0

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        for t in (self.flat, *(getattr(self, k) for k in _STATE)):
            t[slot] = 0.0
        self.opt_step[slot] = 0

    def forward(self, x: torch.Tensor, triton: bool = False) -> torch.Tensor:
        """x (capacity, N, C) float32 -> (capacity, N, C): every slot at once. With `triton`
        (the layer's kernels), a residual_mlp of narrow chunks runs as one fused kernel."""
        if triton and self._fusable and (x.is_cuda or kernels.interpreting()):
            return kernels.residual_mlp(x, self.flat, self.spec.hidden)
        return self._forward(self.params, x)

    def grads(self) -> list[torch.Tensor]:
        return [] if self.flat.grad is None else [self.flat.grad]

    @property
    def named_grads(self) -> dict[str, torch.Tensor] | None:
        return None if self.flat.grad is None else self.view(self.flat.grad)

    @torch.no_grad()
    def seed_step(self, trainable: torch.Tensor, cfg: KasminaConfig,
                  grad_scale: torch.Tensor | None = None, overflow_ok: bool = False,
                  triton: bool = False, into: tuple[torch.Tensor, ...] | None = None,
                  lr: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """One masked Adam(W) step on the slots where `trainable` (capacity,) and the gradient is
        finite. `grad_scale` (capacity,): what each slot's gradient is divided by first (an AMP
        loss scale). Returns per-slot (grad_norm, grad_finite, drift); no host synchronisation.
        With `overflow_ok` (a GradScaler) a non-finite gradient skips the slot's step, as the
        scaler skips the host's, and reads as finite. With `triton` (the layer's kernels) it is
        one fused kernel (kernels/triton_step.py), the same formulas. `into` = the layer's
        (grad_norm, drift, nonfinite, running) lane views: the results are written there
        (nonfinite |= running & ~finite) and None is returned. `lr` (capacity,): each slot's
        learning rate (its seed's spec's), 0 where `cfg.seed_lr` applies; None: cfg.seed_lr."""
        p = self.flat
        if triton and (p.is_cuda or kernels.interpreting()):
            from .kernels import triton_step
            out = triton_step.seed_step(p, p.grad, self.exp_avg, self.exp_avg_sq, self.ema,
                                        self.opt_step, trainable, grad_scale, cfg.seed_lr,
                                        cfg.seed_betas, cfg.seed_eps, cfg.seed_weight_decay,
                                        cfg.drift_ema, overflow_ok, into, lr)
            p.grad = None
            return out
        g = p.grad if p.grad is not None else torch.zeros_like(p)  # (capacity, P)
        if grad_scale is not None:
            g = g / grad_scale[:, None]
        sq = g.square().sum(1)
        finite = torch.isfinite(sq)
        update = trainable & finite  # (capacity,)
        self.opt_step.add_(update)  # (not +=: a Module.__setattr__ a step)
        b1, b2 = cfg.seed_betas
        step = self.opt_step.clamp(min=1.0)[:, None]
        u = update[:, None]
        g = torch.where(u, g, 0.0)
        self.exp_avg.copy_(torch.where(u, self.exp_avg.lerp(g, 1 - b1), self.exp_avg))
        self.exp_avg_sq.copy_(torch.where(u, self.exp_avg_sq * b2 + g * g * (1 - b2),
                                          self.exp_avg_sq))
        delta = (self.exp_avg / (1 - b1 ** step)) / (
            (self.exp_avg_sq / (1 - b2 ** step)).sqrt() + cfg.seed_eps)
        if cfg.seed_weight_decay:
            delta = delta + cfg.seed_weight_decay * p
        rate = cfg.seed_lr if lr is None else torch.where(lr > 0, lr, cfg.seed_lr)[:, None]
        p.copy_(torch.where(u, p - rate * delta, p))
        self.ema.copy_(torch.where(u, self.ema.lerp(p, 1 - cfg.drift_ema), self.ema))
        drift = (p - self.ema).norm(dim=1) / self.ema.norm(dim=1).clamp(min=1e-12)
        p.grad = None
        norm = torch.where(finite, sq.sqrt(), 0.0) if overflow_ok else sq.sqrt()
        if into is None:
            return norm, finite | overflow_ok, drift
        grad_norm, drift_out, nonfinite, running = into
        grad_norm.copy_(norm), drift_out.copy_(drift)
        if not overflow_ok:
            nonfinite |= ~finite & running
        return None
