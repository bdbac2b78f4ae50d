"""`BlueprintBank`: the parameters of every seed of one blueprint spec in one layer, slot-major.

All seeds of a spec run as one batched op (`forward` gathers their slots), and the seeds' own
optimizer is a masked Adam over the whole bank: one set of tensor ops per bank per step, whatever
the number of seeds, with per-slot step counts so a frozen or newly germinated seed is exact.
The bank keeps float32 master weights whatever the host's dtype. Capacity grows by doubling; a
checkpoint of any capacity loads into a fresh bank (see `_load_from_state_dict`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blueprints import KINDS, BlueprintSpec
from .config import KasminaConfig

_STATE = ("exp_avg", "exp_avg_sq", "ema")  # per-parameter optimizer / drift state


class BlueprintBank(nn.Module):
    def __init__(self, spec: BlueprintSpec, chunk: int, device: torch.device,
                 capacity: int = 0) -> None:
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

    def grow(self, capacity: int) -> None:
        """Resize to `capacity` slots, keeping the contents of the existing ones."""
        old = self.capacity
        if capacity <= old:
            return

        def bigger(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(capacity, *t.shape[1:])
            out[:old] = t
            return out

        with torch.no_grad():
            for n in self._shapes:
                self.params[n] = nn.Parameter(bigger(self.params[n].data))
                for k in _STATE:
                    setattr(self, f"{k}_{n}", bigger(self._state(k, n)))
            self.opt_step = bigger(self.opt_step)

    @torch.no_grad()
    def init_slot(self, slot: int) -> None:
        """Fresh random parameters (uniform ±1/sqrt(fan_in), as nn.Linear) and empty state."""
        if slot >= self.capacity:
            self.grow(max(4, 2 * self.capacity, slot + 1))
        for n, p in self.params.items():
            bound = 1.0 / math.sqrt(self._fan_in[n])
            p[slot].uniform_(-bound, bound)
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

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x (A, N, C) float32, slots (A,) long -> (A, N, C)."""
        p = {n: t.index_select(0, slots) for n, t in self.params.items()}
        return self._forward(p, x)

    @torch.no_grad()
    def seed_step(self, trainable: torch.Tensor, cfg: KasminaConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One masked Adam(W) step on the slots where `trainable` (capacity,) and the gradient is
        finite. Returns per-slot (grad_norm, grad_finite, drift); no host synchronisation."""
        sq = torch.zeros(self.capacity, device=self.opt_step.device)
        grads = {}
        for n, p in self.params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
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
        return sq.sqrt(), finite, drift

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        key = prefix + "opt_step"
        if key in state_dict:
            self.grow(int(state_dict[key].shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
