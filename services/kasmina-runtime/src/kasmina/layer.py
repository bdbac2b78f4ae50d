"""`KasminaLayer`: a drop-in `nn.Linear` whose output features are split into chunks, each
watched by a seed that can grow a blueprint through the 11-stage lifecycle (DESIGN §3).

Hot path (forward, `step`): a fixed number of tensor ops whatever `num_seeds`, no Python loop
over seeds, no read back from the device. Everything that branches per seed (stage changes,
gates, reports) happens on the host side at epoch boundaries or on commands, see `seeds.py`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import kernels
from .bank import BlueprintBank
from .blueprints import get_blueprint
from .config import KasminaConfig
from .lifecycle import SeedStage
from .plan import STAGE, ForwardPlan, build_plan
from .seeds import SeedLifecycleMixin
from .strategies import GraftContext, get_strategy
from .telemetry import SeedTelemetry


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


class _AttachLoss(torch.autograd.Function):
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


class KasminaLayer(SeedLifecycleMixin, nn.Module):
    def __init__(self, host: nn.Linear, num_seeds: int, config: KasminaConfig | None = None,
                 layer_id: str = "") -> None:
        super().__init__()
        if not isinstance(host, nn.Linear):
            raise TypeError(f"KasminaLayer wraps nn.Linear, got {type(host).__name__}")
        self.host = host
        self.config = config or KasminaConfig()
        self.layer_id = layer_id
        self.num_seeds = num_seeds
        self.chunks = split_chunks(host.out_features, num_seeds)
        self.chunk_width = max(e - s for s, e in self.chunks)  # padded width of a bank's chunk
        device = host.weight.device
        state = torch.zeros(num_seeds, 4, dtype=torch.int32)
        state[:, 1:4:2] = -1  # BLUEPRINT_ID and STRATEGY: none
        self.register_buffer("state", state.to(device))
        self.register_buffer("alpha", torch.zeros(num_seeds, device=device))
        self.register_buffer("slot", torch.full((num_seeds,), -1, dtype=torch.int32,
                                                device=device))
        self.register_buffer("steps_in_stage", torch.zeros(num_seeds, dtype=torch.int64,
                                                           device=device))
        self.register_buffer("recon_ratio", torch.full((num_seeds,), float("nan"),
                                                       device=device))
        self.register_buffer("grad_norm", torch.zeros(num_seeds, device=device))
        self.register_buffer("drift", torch.zeros(num_seeds, device=device))
        self.register_buffer("nonfinite", torch.zeros(num_seeds, dtype=torch.bool,
                                                      device=device))
        self.register_buffer("strategy_state", torch.zeros(num_seeds, 2, device=device))
        self.telemetry = SeedTelemetry(self.chunks, self.config, device)
        self.banks = nn.ModuleDict()
        self._init_lifecycle()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_from_buffers())

    def extra_repr(self) -> str:
        return (f"layer_id={self.layer_id!r}, num_seeds={self.num_seeds}, "
                f"chunk_width={self.chunk_width}")

    # ---------------------------------------------------------------- hot path
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)  # (..., F)
        plan: ForwardPlan = self._plan
        tracking = self.training and self._tracking_step
        if not (tracking or plan.num_running):
            return h
        h2 = h.reshape(-1, h.shape[-1])  # (N, F)
        out, stats, loss = h, None, None
        if plan.num_running:
            xs, y, ok = self._run_blueprints(h2, plan)
            if plan.has_train and self.training and torch.is_grad_enabled():
                loss = self._reconstruction_loss(xs, y, plan, ok)
            if plan.has_blend:  # one fused pass: blend, and the telemetry when tracking
                alpha = torch.where(ok, self.alpha.index_select(0, plan.seeds) * plan.blend, 0.0)
                out2, stats = kernels.chunk_blend(h2, y, alpha, plan.feat, plan.run_of,
                                                  plan.bounds, tracking,
                                                  self.config.dead_threshold, plan.align,
                                                  self._triton)
                out = out2.view_as(h)
        if tracking:
            if stats is None:  # nothing blended: a read-only pass over the host output
                stats = kernels.column_stats(h2.detach(), self.config.dead_threshold,
                                             self._triton)
            self.telemetry.add(stats, h2.detach())
        if loss is not None:
            out = _AttachLoss.apply(out, loss)
        return out

    def _run_blueprints(self, h2: torch.Tensor, plan: ForwardPlan
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running seeds' chunks through their blueprints, one batched op per blueprint.
        Returns (inputs, outputs) as (A, N, C) float32 and which seeds are finite (A,)."""
        n, a, c = h2.shape[0], plan.num_running, self.chunk_width
        hg = h2.index_select(1, plan.gather_idx).view(n, a, c).transpose(0, 1)  # (A, N, C)
        xs = hg.detach().float()
        if plan.through is not None:  # exact value, gradient only for non-isolated seeds
            xs = xs + (hg.float() - xs) * plan.through
        if plan.valid is not None:
            xs = xs * plan.valid
        y = torch.cat([self.banks[key](xs[s:e], plan.slots[s:e])
                       for key, s, e in plan.segments]).contiguous()  # (A, N, C)
        with torch.no_grad():  # a non-finite seed stays off until the boundary rolls it back
            bad = self.nonfinite.index_select(0, plan.seeds) | ~torch.isfinite(y).flatten(1).all(1)
            self.nonfinite.index_copy_(0, plan.seeds, bad)
        return xs, y, ~bad

    def _reconstruction_loss(self, xs: torch.Tensor, y: torch.Tensor, plan: ForwardPlan,
                             ok: torch.Tensor) -> torch.Tensor:
        """Sum over TRAINING seeds of mse(bp(x), x); tracks mse / var(x) for the gate."""
        diff = y - xs
        if plan.valid is not None:
            diff = diff * plan.valid
        elems = plan.sizes * xs.shape[1]  # (A,)
        mse = diff.square().sum((1, 2)) / elems
        with torch.no_grad():
            mean = xs.sum((1, 2)) / elems
            var = (xs.square().sum((1, 2)) / elems - mean.square()).clamp(min=1e-12)
            ratio = mse / var
            old = self.recon_ratio.index_select(0, plan.seeds)
            ema = torch.where(torch.isnan(old), ratio, 0.9 * old + 0.1 * ratio)
            self.recon_ratio.index_copy_(0, plan.seeds, torch.where(plan.train & ok, ema, old))
        return torch.where(plan.train & ok, mse, 0.0).sum()

    @torch.no_grad()
    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Report one training step (call once, after the host optimizer's step): the seeds'
        optimizer steps, grafting alphas move, step counters advance."""
        self._step += 1
        self._tracking_step = self._step % self.config.telemetry_every == 0
        plan: ForwardPlan = self._plan
        if not plan.num_running:
            return
        for key, s, e in plan.segments:
            seeds, slots = plan.seeds[s:e], plan.slots[s:e]
            norm, finite, drift = self.banks[key].seed_step(plan.trainable[key], self.config)
            self.grad_norm.index_copy_(0, seeds, norm.index_select(0, slots))
            self.drift.index_copy_(0, seeds, drift.index_select(0, slots))
            bad = self.nonfinite.index_select(0, seeds) | ~finite.index_select(0, slots)
            self.nonfinite.index_copy_(0, seeds, bad)
        self.steps_in_stage.index_add_(0, plan.seeds, torch.ones_like(plan.seeds))
        if isinstance(loss, (int, float)):
            loss = torch.tensor(float(loss), device=self.alpha.device)
        for strategy_id, seeds in plan.grafting.items():
            ctx = GraftContext(
                steps=self.steps_in_stage.index_select(0, seeds),
                drift=self.drift.index_select(0, seeds),
                grad_norm=self.grad_norm.index_select(0, seeds),
                loss=loss, state=self.strategy_state.index_select(0, seeds),
                config=self.config)
            alpha, state = get_strategy(strategy_id).update(self.alpha.index_select(0, seeds), ctx)
            self.alpha.index_copy_(0, seeds, alpha.clamp(0.0, 1.0))
            self.strategy_state.index_copy_(0, seeds, state)

    # ---------------------------------------------------------------- structure
    def _bank(self, blueprint_id: int) -> BlueprintBank:
        key = str(blueprint_id)
        if key not in self.banks:
            self.banks[key] = BlueprintBank(get_blueprint(blueprint_id), self.chunk_width,
                                            self.alpha.device)
        return self.banks[key]

    def _rebuild_plan(self) -> None:
        self._triton = kernels.use_triton(self.config.kernels, self.alpha.device)
        self._plan = build_plan(
            self._mirror, self._slot, self.chunks, self.chunk_width,
            {k: b.capacity for k, b in self.banks.items()}, self.config.isolate_host_in_blend,
            self._counterfactual, self.alpha.device)

    def _push_state(self) -> None:
        self.state.copy_(torch.from_numpy(self._mirror))
        self.slot.copy_(torch.from_numpy(self._slot))
        self._rebuild_plan()

    def _sync_from_buffers(self) -> None:
        """After load_state_dict: the host-side mirror follows the loaded buffers."""
        self._mirror = self.state.cpu().numpy().astype(np.int32).copy()
        self._slot = self.slot.cpu().numpy().astype(np.int32).copy()
        self._rebuild_plan()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Create the banks a checkpoint has, so a fresh layer loads without re-germinating.
        for key in state_dict:
            if key.startswith(prefix + "banks.") and key.endswith(".opt_step"):
                self._bank(int(key[len(prefix + "banks."):].split(".")[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        """`.to(dtype)` and friends change the host only: alpha stays float32, accumulators
        float64 and blueprints keep float32 master weights; devices move together."""
        self.host._apply(fn, recurse)
        device = fn(torch.zeros(1, device=self.alpha.device)).device
        move = lambda t: t.to(device)  # noqa: E731
        for name, child in self.named_children():
            if name != "host":
                child._apply(move, recurse)
        super()._apply(move, recurse=False)
        if hasattr(self, "_plan"):
            self._rebuild_plan()
        return self

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy / pickle
        super().__setstate__(state)
        self._rebuild_plan()

    @property
    def stage_counts(self) -> dict[str, int]:
        values, counts = np.unique(self._mirror[:, STAGE], return_counts=True)
        return {SeedStage(int(v)).name: int(c) for v, c in zip(values, counts, strict=True)}
