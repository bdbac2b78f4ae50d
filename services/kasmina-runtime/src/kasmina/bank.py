"""`BlueprintBank`: the parameters of every seed of one blueprint spec in one layer, slot-major.

The capacity is fixed at construction (so the layer's parameter set never changes); every slot
runs as one batched op (free slots compute on zeros and are masked by the layer), and the seeds'
own optimizer is a masked Adam over the whole bank: one set of tensor ops per bank per step,
whatever the number of seeds, with per-slot step counts so a frozen or newly germinated seed is
exact. The bank keeps float32 master weights whatever the host's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blueprints import KINDS, BlueprintSpec
from .config import KasminaConfig

_STATE = ("exp_avg", "exp_avg_sq", "ema")  # per-parameter optimizer / drift state


class BlueprintBank(nn.Module):
    def __init__(self, spec: BlueprintSpec, chunk: int, capacity: int,
                 device: torch.device) -> None:
        super().__init__()
        self.spec, self.chunk = spec, chunk
        self._shapes = spec.shapes(chunk)
        self._fan_in = KINDS[spec.kind].fan_in(spec, chunk)
        self._forward = KINDS[spec.kind].forward
        self.params = nn.ParameterDict({
            n: nn.Parameter(torch.zeros(capacity, *s, device=device))
            for n, s in self._shapes.items()})
        for n, s in self._shapes.items():
            for k in _STATE:
                self.register_buffer(f"{k}_{n}", torch.zeros(capacity, *s, device=device))
        self.register_buffer("opt_step", torch.zeros(capacity, device=device))

    @property
    def capacity(self) -> int:
        return int(self.opt_step.shape[0])

    def _state(self, kind: str, name: str) -> torch.Tensor:
        return getattr(self, f"{kind}_{name}")

    @torch.no_grad()
    def init_slot(self, slot: int, seed: int) -> None:
        """Fresh parameters (uniform ±1/sqrt(fan_in), as nn.Linear) from a generator seeded with
        `seed`, so every rank and every process draws the same ones; empty optimizer state."""
        gen = torch.Generator().manual_seed(seed)
        for n, p in self.params.items():
            bound = 1.0 / math.sqrt(self._fan_in[n])
            fresh = torch.empty(p.shape[1:]).uniform_(-bound, bound, generator=gen)
            p[slot].copy_(fresh)
            self._state("exp_avg", n)[slot].zero_()
            self._state("exp_avg_sq", n)[slot].zero_()
            self._state("ema", n)[slot].copy_(p[slot])
        self.opt_step[slot] = 0

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        for n, p in self.params.items():
            p[slot].zero_()
            for k in _STATE:
                self._state(k, n)[slot].zero_()
        self.opt_step[slot] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (capacity, N, C) float32 -> (capacity, N, C): every slot at once."""
        return self._forward({n: self.params[n] for n in self._shapes}, x)

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params.values() if p.grad is not None]

    @torch.no_grad()
    def seed_step(self, trainable: torch.Tensor, cfg: KasminaConfig,
                  grad_scale: torch.Tensor | None = None, overflow_ok: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One masked Adam(W) step on the slots where `trainable` (capacity,) and the gradient is
        finite. `grad_scale` (capacity,): what each slot's gradient is divided by first (an AMP
        loss scale). Returns per-slot (grad_norm, grad_finite, drift); no host synchronisation.
        With `overflow_ok` (a GradScaler) a non-finite gradient skips the slot's step, as the
        scaler skips the host's, and reads as finite."""
        sq = torch.zeros(self.capacity, device=self.opt_step.device)
        grads = {}
        for n, p in self.params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if grad_scale is not None:
                g = g / grad_scale.view((-1,) + (1,) * (g.dim() - 1))
            grads[n] = g
            sq += g.pow(2).flatten(1).sum(1)
        finite = torch.isfinite(sq)
        update = trainable & finite  # (capacity,)
        self.opt_step += update.float()
        b1, b2 = cfg.seed_betas
        step = self.opt_step.clamp(min=1.0)
        bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step  # (capacity,)
        drift_num = torch.zeros_like(sq)
        drift_den = torch.zeros_like(sq)
        for n, p in self.params.items():
            view = (-1,) + (1,) * (p.dim() - 1)
            u = update.view(view)
            g = torch.where(u, grads[n], 0.0)
            m, v, ema = (self._state(k, n) for k in _STATE)
            m.copy_(torch.where(u, m * b1 + g * (1 - b1), m))
            v.copy_(torch.where(u, v * b2 + g * g * (1 - b2), v))
            delta = (m / bc1.view(view)) / ((v / bc2.view(view)).sqrt() + cfg.seed_eps)
            delta = delta + cfg.seed_weight_decay * p
            p.copy_(torch.where(u, p - cfg.seed_lr * delta, p))
            ema.copy_(torch.where(u, ema * cfg.drift_ema + p * (1 - cfg.drift_ema), ema))
            drift_num += (p - ema).pow(2).flatten(1).sum(1)
            drift_den += ema.pow(2).flatten(1).sum(1)
            p.grad = None
        drift = drift_num.sqrt() / drift_den.sqrt().clamp(min=1e-12)
        norm = torch.where(finite, sq.sqrt(), 0.0) if overflow_ok else sq.sqrt()
        return norm, finite | overflow_ok, drift
