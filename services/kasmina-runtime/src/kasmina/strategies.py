"""Grafting strategies: how alpha moves from 0 to 1 while a seed is GRAFTING (DESIGN §3.3).

A strategy updates the alphas of all grafting seeds that use it in one vectorised call, once per
training step, with tensors on the device (no host synchronisation). New strategies plug in with
`register_strategy`; the `id` is stored in checkpoints and on the wire, so it must be stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .config import KasminaConfig
from .lifecycle import UnknownStrategyError


@dataclass
class GraftContext:
    """Per-seed inputs for the seeds being updated, each (A,) on the device. The layer fills
    only the fields its strategy `reads` (None for the others: each is a gather a step)."""

    steps: torch.Tensor | None  # grafting updates made so far, this one included (>= 1)
    drift: torch.Tensor | None  # ‖w − w_ema‖ / ‖w_ema‖ of the blueprint's weights
    grad_norm: torch.Tensor | None  # the blueprint's gradient norm this step
    loss: torch.Tensor | None  # the training loss of this step (a scalar), if reported
    state: torch.Tensor | None  # (A, 2) float32 scratch owned by the strategy, zero at start
    config: KasminaConfig
    # float32: each seed's ramp length, its spec's `ramp_steps` else config.ramp_steps (the
    # layer fills it); None: config.ramp_steps for every seed
    ramp_steps: torch.Tensor | None = None

    @property
    def ramp_length(self) -> torch.Tensor | int:
        """What every strategy ramps over: the seeds' own lengths, else the config's."""
        return self.config.ramp_steps if self.ramp_steps is None else self.ramp_steps


class GraftingStrategy:
    name: ClassVar[str]
    id: ClassVar[int]
    # The GraftContext fields `update` reads (loss and config are always there); a strategy
    # that does not read `state` returns it as given and the layer keeps it as it was.
    reads: ClassVar[frozenset[str]] = frozenset(
        {"steps", "drift", "grad_norm", "state", "ramp_steps"})

    def update(self, alpha: torch.Tensor, ctx: GraftContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (new alpha, new state); the caller clamps alpha to [0, 1]."""
        raise NotImplementedError

    @staticmethod
    def ramp(alpha: torch.Tensor, ctx: GraftContext, speed: torch.Tensor | float = 1.0
             ) -> torch.Tensor:
        # float32 sums of 1/n fall short of 1 (twelve steps of 1/12 give 0.99999988, and the
        # gate "alpha reached 1" would pass a step late): within 1e-6 of 1 is 1.
        new = alpha + speed / ctx.ramp_length
        return torch.where(new >= 1.0 - 1e-6, 1.0, new)


class FixedRamp(GraftingStrategy):
    """alpha = steps / ramp length: exactly 1 after that many updates (no rounding drift)."""

    name, id = "fixed_ramp", 0
    reads = frozenset({"steps", "ramp_steps"})

    def update(self, alpha, ctx):
        return torch.clamp(ctx.steps.float() / ctx.ramp_length, max=1.0), ctx.state


class PerformanceLinked(GraftingStrategy):
    """Ramp at 2x while an EMA of the step-over-step loss decrease is positive, 0.5x when the loss
    stalls or rises; without a reported loss, the plain ramp. alpha never decreases."""

    name, id = "performance_linked", 1
    reads = frozenset({"steps", "state", "ramp_steps"})
    ema = 0.9

    def update(self, alpha, ctx):
        if ctx.loss is None:
            return self.ramp(alpha, ctx), ctx.state
        loss = ctx.loss.detach().float().to(alpha.device).expand_as(alpha)
        # A non-finite loss (an empty batch's mean, an fp16 overflow) is no loss this step: the
        # state keeps its last finite values; NaN as the previous loss means none seen yet.
        finite = torch.isfinite(loss)
        old_ema, prev_loss = ctx.state[:, 0], ctx.state[:, 1]
        seen = (ctx.steps > 1) & torch.isfinite(prev_loss)
        decrease = torch.where(seen, prev_loss - loss, 0.0)
        ema = torch.where(seen, self.ema * old_ema + (1 - self.ema) * decrease, 0.0)
        ema = torch.where(finite, ema, old_ema)
        prev = torch.where(finite, loss, torch.where(ctx.steps <= 1, float("nan"), prev_loss))
        speed = torch.where(ema > 0, 2.0, 0.5)
        new_alpha = torch.maximum(alpha, self.ramp(alpha, ctx, speed))
        return new_alpha, torch.stack([ema, prev], dim=1)


class DriftControlled(GraftingStrategy):
    """Hold while the blueprint's weight drift exceeds `drift_threshold`, else ramp."""

    name, id = "drift_controlled", 2
    reads = frozenset({"drift", "ramp_steps"})

    def update(self, alpha, ctx):
        hold = ctx.drift > ctx.config.drift_threshold
        return torch.where(hold, alpha, self.ramp(alpha, ctx)), ctx.state


class GradNormGated(GraftingStrategy):
    """Ramp only while the seed's gradient norm is inside [grad_norm_lower, grad_norm_upper]."""

    name, id = "grad_norm_gated", 3
    reads = frozenset({"grad_norm", "ramp_steps"})

    def update(self, alpha, ctx):
        cfg = ctx.config
        inside = (ctx.grad_norm >= cfg.grad_norm_lower) & (ctx.grad_norm <= cfg.grad_norm_upper)
        return torch.where(inside, self.ramp(alpha, ctx), alpha), ctx.state


_BY_NAME: dict[str, GraftingStrategy] = {}
_BY_ID: dict[int, GraftingStrategy] = {}


def register_strategy(cls: type[GraftingStrategy]) -> type[GraftingStrategy]:
    """Register a strategy class by its `name` and `id` (usable as a class decorator)."""
    for existing in (_BY_NAME.get(cls.name), _BY_ID.get(cls.id)):
        if existing is not None and type(existing) is not cls:
            raise ValueError(f"strategy {cls.name!r}/id {cls.id} conflicts with "
                             f"{type(existing).__name__}")
    _BY_NAME[cls.name] = _BY_ID[cls.id] = cls()
    return cls


def get_strategy(key: str | int) -> GraftingStrategy:
    found = _BY_ID.get(key) if isinstance(key, int) else _BY_NAME.get(key)
    if found is None:
        raise UnknownStrategyError(f"unknown grafting strategy {key!r}; known: {sorted(_BY_NAME)}")
    return found


def strategies() -> list[str]:
    return sorted(_BY_NAME)


for _cls in (FixedRamp, PerformanceLinked, DriftControlled, GradNormGated):
    register_strategy(_cls)
