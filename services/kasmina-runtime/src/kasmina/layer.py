"""`KasminaLayer`: a drop-in linear layer whose output features are split into chunks, each
watched by a seed that can grow a blueprint through the 11-stage lifecycle (DESIGN §3).

The layer is a composition: the host-side `SeedTable` (stages, slots, records, readiness) and,
on the device, fixed banks of blueprint parameters and the lane tensors of `lanes.py`. Commands
and epoch boundaries change the table, then `_commit` writes the tensors once. The hot path
(forward, `step`) launches the same ops whatever the number of seeds, has no Python loop over
seeds and reads nothing back from the device; under `torch.compile` it reads no Python state a
stage change touches, so the graph is compiled once (per train/eval mode and telemetry step).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from . import boundary, distributed, fused, graphs, kernels
from .bank import BlueprintBank
from .blueprints import BlueprintSpec, catalog, get_blueprint, with_headroom
from .config import KasminaConfig
from .events import LifecycleEvent, SeedOutcome
from .graphs import SeedGraphs
from .host import AttachLoss, ShadowGradient, hook_in_eval, host_features, split_chunks
from .lanes import LANE_TENSORS, LaneFlags, build_lanes
from .lifecycle import FULL, LEGACY, RELEASING_STAGES, LifecycleError, SeedStage
from .seed_table import STAGE, SeedTable
from .strategies import GraftContext, get_strategy
from .telemetry import LayerHealthReport, SeedTelemetry

S = SeedStage
# GraftContext's per-seed fields and the lane tensors they are gathered from.
_GRAFT_INPUTS = {"steps": "lane_steps", "drift": "lane_drift", "grad_norm": "lane_grad_norm",
                 "state": "lane_strategy_state", "ramp_steps": "lane_ramp_steps"}
# Per-lane statistics of the running seeds (persistent: checkpointed), name -> fill value.
_LANE_STATS = {"lane_steps": 0, "lane_recon": float("nan"), "lane_grad_norm": 0.0,
               "lane_drift": 0.0, "lane_nonfinite": False}


class KasminaLayer(nn.Module):
    _graphs: SeedGraphs | None = None  # KasminaConfig.cuda_graphs (a layer pickled before it: off)

    def __init__(self, host: nn.Module, num_seeds: int, config: KasminaConfig | None = None,
                 layer_id: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = host_features(host)
        self.host = host
        self.config = cfg = config or KasminaConfig()
        self.num_seeds = num_seeds
        self.chunks = split_chunks(self.out_features, num_seeds)
        self.chunk_width = width = max(e - s for s, e in self.chunks)  # a bank's padded chunk
        device = host.weight.device
        # Banks: one per blueprint that fits some chunk, fixed for the layer's life.
        names = cfg.blueprints if cfg.blueprints is not None else [s.name for s in catalog()]
        slots = cfg.bank_slots or min(num_seeds, 4 * cfg.max_active_seeds)
        widths = {e - s for s, e in self.chunks}
        self.banks = nn.ModuleDict()
        lanes, start = {}, 0
        for spec in (get_blueprint(n) for n in names):
            fitting = sum(spec.fits(w) for w in (e - s for s, e in self.chunks))
            if not any(spec.fits(w) for w in widths) or slots == 0:
                continue
            capacity = min(slots, fitting)
            self.banks[str(spec.id)] = BlueprintBank(
                with_headroom(spec, cfg.bank_hidden, cfg.bank_rank), width, capacity, device)
            lanes[spec.id] = (start, start + capacity)
            start += capacity
        self._bank_of_lane = np.repeat(np.arange(len(lanes)),
                                       [e - s for s, e in lanes.values()])
        if cfg.execution_path == "legacy" and num_seeds != 1:
            raise ValueError(f"the legacy execution path has one seed over the whole layer, got "
                             f"num_seeds={num_seeds} (kasmina.DualPathLayer switches a layer "
                             f"between the legacy seed and {num_seeds} chunked ones)")
        self.table = SeedTable(self.chunks, lanes, cfg.max_active_seeds, cfg.embargo_epochs,
                               layer_id, LEGACY if cfg.execution_path == "legacy" else FULL,
                               bank_specs={int(k): b.spec for k, b in self.banks.items()})
        self.register_buffer("state", torch.from_numpy(self.table.state).to(device, copy=True))
        self.register_buffer("alpha", torch.zeros(num_seeds, device=device))
        self.register_buffer("slot", torch.from_numpy(self.table.slot).to(device, copy=True))
        self.num_lanes = num_lanes = self.table.num_lanes
        features = self.out_features
        for name, (dtype, shape) in LANE_TENSORS.items():
            self.register_buffer(name, torch.zeros(shape(num_lanes, width, features),
                                                   dtype=dtype, device=device), persistent=False)
        for name, fill in _LANE_STATS.items():
            dtype = {int: torch.int64, float: torch.float32, bool: torch.bool}[type(fill)]
            self.register_buffer(name, torch.full((num_lanes,), fill, dtype=dtype,
                                                  device=device))
        self.register_buffer("lane_strategy_state", torch.zeros(num_lanes, 2, device=device))
        self.telemetry = SeedTelemetry(self.chunks, cfg, device)
        # gcd of every chunk's start and width (and 16): lets the blend's loads vectorise.
        self._align = int(np.gcd.reduce([*(v for c in self.chunks for v in c), 16]))
        self._flags = LaneFlags()
        self._tracking_step = True
        # Steps reported this epoch while a blueprint ran, and how many of them in train mode.
        self._live_steps = self._train_mode_steps = 0
        self._last_report: LayerHealthReport | None = None
        self._loaded_extra: dict | None = None
        self._batching = False
        self._graphs = graphs.for_setting(cfg.cuda_graphs)
        self.train(host.training)  # (wrapping a model in eval mode: the hook's from the start)
        self.register_load_state_dict_post_hook(_after_load_hook)
        self._commit()

    # ---------------------------------------------------------------- drop-in surface
    @property
    def weight(self) -> torch.Tensor:
        return self.host.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.host.bias

    @property
    def layer_id(self) -> str:
        return self.table.layer_id

    @layer_id.setter
    def layer_id(self, value: str) -> None:
        self.table.layer_id = value

    def extra_repr(self) -> str:
        return (f"layer_id={self.layer_id!r}, num_seeds={self.num_seeds}, "
                f"chunk_width={self.chunk_width}, banks={self.bank_names()}")

    def bank_names(self) -> list[str]:
        return [bank.spec.name for bank in self.banks.values()]

    def blueprint_parameters(self) -> list[nn.Parameter]:
        """The seeds' parameters, stepped by their own optimizer (`step`), never the host's."""
        return list(self.banks.parameters())

    @property
    def execution_path(self) -> str:
        """"chunked" (the 11-stage lifecycle over chunks) or "legacy" (one seed, short one)."""
        return self.table.lifecycle.name

    @property
    def promotion_stage(self) -> SeedStage:
        """The stage a controller promotes a germinated seed to (TRAINING; GRAFTING in legacy)."""
        return self.table.lifecycle.promotion

    def train(self, mode: bool = True) -> KasminaLayer:
        super().train(mode)
        hook_in_eval(self, mode)
        return self

    # ---------------------------------------------------------------- hot path
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (compiled: the seeds' general path; is_compiling first, so dynamo does not guard on
        # `_flags`, and never a hook)
        if torch.compiler.is_compiling():
            return self.seed_forward(self.host(x))
        training = self.training
        if not self._flags.live:  # dormant: the host alone, and its telemetry, in this frame
            out = self.host(x)  # (every dormant step pays this Python: NOTES, s14)
            if training and self._tracking_step and out.numel():
                self.telemetry.observe(out.detach().reshape(-1, out.shape[-1]),
                                       self.config.dead_threshold, self._triton)
        else:
            out = self._live_forward(x, training and self._tracking_step)
        if training and self.config.track_output_gradient and out.requires_grad:
            out.register_hook(self.telemetry.observe_gradient)
        return out

    def _live_forward(self, x: torch.Tensor, tracking: bool) -> torch.Tensor:
        if self._graphs is not None:
            out = self._graphs.forward(self, x, tracking, True)
            if out is not None:  # host and seeds replayed as one graph (kasmina.graphs)
                return out
        if fused.applies(self, x):  # a plain Linear or Conv1D host: one node, blend in place
            return fused.forward(self, x, tracking)
        return self.seed_forward(self.host(x))

    def _host_and_seeds(self, x: torch.Tensor, tracking: bool) -> torch.Tensor:
        """The whole layer eagerly (what kasmina.graphs captures)."""
        if fused.applies(self, x):
            return fused.forward(self, x, tracking)
        return self._seed_forward_eager(self.host(x), False, tracking)

    def seed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The seeds' part of the forward, on the host's output h (..., F): `forward` is
        `seed_forward(host(x))`; a `DualPathLayer` runs two of these on one host output."""
        # Compiled, every lane runs: nothing below may read what a commit changes in Python
        # (`_flags`), or dynamo would guard on it and recompile at every stage change.
        compiling = torch.compiler.is_compiling()
        flags = None if compiling else self._flags
        tracking = self.training and self._tracking_step
        live = compiling or flags.live
        if not (tracking or live) or h.numel() == 0:
            return h
        if live and not compiling and self._graphs is not None:
            out = self._graphs.forward(self, h, tracking, False)
            if out is not None:
                return out
        return self._seed_forward_eager(h, compiling, tracking)

    def _seed_forward_eager(self, h: torch.Tensor, compiling: bool, tracking: bool
                            ) -> torch.Tensor:
        flags = None if compiling else self._flags
        live = compiling or flags.live
        h2 = h.reshape(-1, h.shape[-1])  # (N, F)
        out, stats, loss, shadow = h, None, None, None
        if live:
            xs, y, ok = self._run_blueprints(h2, compiling)
            if self.training and torch.is_grad_enabled() and (compiling or flags.has_train):
                loss = self._reconstruction_loss(xs, y, ok)
                if self.config.training_task_share:  # (L,): the finite TRAINING lanes' share
                    shadow = self.config.training_task_share * (self.lane_train & ok).float()
            if compiling or flags.has_blend:  # one fused pass: blend, telemetry when tracking
                alpha = torch.where(ok, self.alpha.index_select(0, self.lane_index)
                                    * self.lane_blend, 0.0)
                out2, stats = kernels.chunk_blend(h2, y, alpha, self.run_of, self.bounds,
                                                  tracking, self.config.dead_threshold,
                                                  self._align, self._triton)
                out = out2.view_as(h)
        if tracking:
            if stats is None:  # nothing blended: a read-only pass over the host output
                self.telemetry.observe(h2.detach(), self.config.dead_threshold, self._triton)
            else:
                self.telemetry.add(stats, h2.detach(), self._triton)
        if shadow is not None:
            out = ShadowGradient.apply(out, y, shadow, self.lane_gather, self.lane_valid)
        if loss is not None:
            out = AttachLoss.apply(out, loss)
        return out

    @property
    def _triton(self) -> bool:
        return kernels.use_triton(self.config.kernels, self.alpha.device)

    def _run_blueprints(self, h2: torch.Tensor, compiling: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every lane's chunk through its bank, one batched op per bank. Returns inputs and
        outputs as (L, N, W) float32, and which lanes are finite (L,). In eager mode a bank
        with no running lane is skipped (its outputs stand in as its inputs, never blended)."""
        n, num_lanes, w = h2.shape[0], self.num_lanes, self.chunk_width
        hg = h2.index_select(1, self.lane_gather).view(n, num_lanes, w).transpose(0, 1)
        xs = hg.detach().float()
        if compiling or self._flags.has_through:  # exact value; gradient where through
            xs = xs + (hg.float() - xs) * self.lane_through
        xs = xs * self.lane_valid
        parts, start = [], 0
        for key, bank in self.banks.items():
            end = start + bank.capacity
            run = compiling or key in self._flags.banks
            parts.append(bank(xs[start:end], self._triton) if run else xs[start:end])
            start = end
        # (L, N, W), contiguous for the blend kernels (xs is a transposed view of h2)
        y = (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()
        with torch.no_grad():  # a non-finite lane stays off until the boundary rolls it back
            bad = self.lane_nonfinite | (self.lane_running & ~torch.isfinite(y).flatten(1).all(1))
            self.lane_nonfinite.copy_(bad)
        return xs, y, ~bad

    def _reconstruction_loss(self, xs: torch.Tensor, y: torch.Tensor,
                             ok: torch.Tensor) -> torch.Tensor:
        """Sum over TRAINING lanes of mse(bp(x), x); tracks mse / var(x) for the gate."""
        diff = (y - xs) * self.lane_valid
        elems = self.lane_sizes * xs.shape[1]  # (L,)
        mse = diff.square().sum((1, 2)) / elems
        train = self._track_reconstruction(mse.detach(), xs.sum((1, 2)) / elems,
                                           xs.square().sum((1, 2)) / elems, ok)
        return torch.where(train, mse, 0.0).sum()

    @torch.no_grad()
    def _track_reconstruction(self, mse: torch.Tensor, mean: torch.Tensor, msq: torch.Tensor,
                              ok: torch.Tensor) -> torch.Tensor:
        """The EMA of mse / var(x) on the finite TRAINING lanes (the reconstruction gate reads
        it), from each lane's means of (y - x)^2, x and x^2. Returns those lanes."""
        train = self.lane_train & ok
        ratio = mse / (msq - mean.square()).clamp(min=1e-12)
        old = self.lane_recon
        ema = torch.where(torch.isnan(old), ratio, 0.9 * old + 0.1 * ratio)
        self.lane_recon.copy_(torch.where(train, ema, old))
        return train

    def set_telemetry_every(self, every: int) -> None:
        """Change the telemetry cadence (KasminaConfig.telemetry_every) now: the next forward
        follows it (the fleet's telemetry-level flag, at an epoch boundary)."""
        self.config = self.config.replace(telemetry_every=every)
        if self._graphs is not None:
            self._graphs.clear()
        self._tracking_step = self.table.step % every == 0

    def set_cuda_graphs(self, on: bool | str = True) -> None:
        """Set KasminaConfig.cuda_graphs now: True, False or "auto" (see kasmina.graphs)."""
        self.config = self.config.replace(cuda_graphs=on)
        self._graphs = graphs.for_setting(on)

    def step(self, loss: torch.Tensor | float | None = None,
             scaler: torch.amp.GradScaler | None = None) -> None:
        """Report one training step (call once, after the host optimizer's step; with AMP,
        pass the `GradScaler` and call before `scaler.update()`): the seeds' optimizer steps,
        grafting alphas move, step counters advance."""
        if (scaler is not None and scaler.is_enabled() and self.config.training_task_share
                and self._flags.has_train):
            raise ValueError("KasminaConfig.training_task_share with a GradScaler: the TRAINING "
                             "seeds' task gradient is scaled and their reconstruction's is not")
        table, state = self.table, self.__dict__
        table.step += 1
        # (through __dict__: nn.Module's __setattr__ checks parameters, buffers and modules)
        state["_tracking_step"] = table.step % self.config.telemetry_every == 0
        if self._flags.live:  # a dormant layer's step is these three lines: no grad-mode switch
            state["_live_steps"] += 1
            state["_train_mode_steps"] += self.training
            if self._graphs is None or not self._graphs.step(self, loss, scaler):
                self._step_seeds(loss, scaler)

    @torch.no_grad()
    def _step_seeds(self, loss: torch.Tensor | float | None,
                    scaler: torch.amp.GradScaler | None) -> None:
        """The seeds' step, tensor work only (a CUDA graph captures it: graphs.py)."""
        flags = self._flags
        keys, triton = flags.banks, self._triton
        distributed.all_reduce_mean_([g for k in keys for g in self.banks[k].grads()])
        scale = None
        if scaler is not None and scaler.is_enabled() and scaler._scale is not None:
            # The task loss's gradients are scaled; the reconstruction loss's (TRAINING) not.
            scale = torch.where(self.lane_train, 1.0, scaler._scale.float().to(self.alpha.device))
        start = 0
        for key, bank in self.banks.items():
            end = start + bank.capacity
            if key in keys:  # (a bank of every lane takes the lane tensors themselves)
                own = (lambda t: t) if bank.capacity == self.num_lanes else (
                    lambda t, a=start, b=end: t[a:b])
                bank.seed_step(
                    own(self.lane_trainable), self.config,
                    None if scale is None else own(scale), overflow_ok=scale is not None,
                    triton=triton, into=(own(self.lane_grad_norm), own(self.lane_drift),
                                         own(self.lane_nonfinite), own(self.lane_running)),
                    lr=own(self.lane_lr))
            else:  # compiled graphs run every bank: drop the (zero) gradient of idle ones
                bank.flat.grad = None
            start = end
        self.lane_steps.add_(self.lane_running)
        if flags.grafting and isinstance(loss, torch.Tensor) and distributed.world_size() > 1:
            loss = loss.detach().float().reshape(()).clone()  # the strategies read every rank's
            distributed.all_reduce_mean_([loss])
        elif isinstance(loss, (int, float)):
            loss = torch.tensor(float(loss), device=self.alpha.device)
        for strategy_id, (seeds, lanes) in (flags.grafting or {}).items():
            strategy = get_strategy(strategy_id)
            ctx = GraftContext(loss=loss, config=self.config, **{
                field: getattr(self, lane).index_select(0, lanes) if field in strategy.reads
                else None for field, lane in _GRAFT_INPUTS.items()})
            alpha, state = strategy.update(self.alpha.index_select(0, seeds), ctx)
            self.alpha.index_copy_(0, seeds, alpha.clamp(0.0, 1.0))
            if "state" in strategy.reads:
                self.lane_strategy_state.index_copy_(0, lanes, state)

    # ---------------------------------------------------------------- commit
    @torch.no_grad()
    def _commit(self) -> None:
        """Apply the table's changes to the tensors: one write of the stage table and of the
        lanes, whatever the number of transitions since the last commit."""
        table = self.table
        for change in table.changes:
            lane, seed = change.lane, change.seed
            if change.target in (S.GRAFTING, *RELEASING_STAGES):
                self.alpha[seed] = 0.0
            if lane < 0:
                continue
            self.lane_steps[lane] = 0
            if change.target is S.TRAINING:
                self.lane_recon[lane] = float("nan")
            if change.target is S.GRAFTING:
                self.lane_strategy_state[lane] = 0.0
            bank, local = self._bank_slot(lane)
            if change.init_seed is not None:
                bank.init_slot(local, change.init_seed, get_blueprint(change.blueprint_id))
            if change.target in RELEASING_STAGES:
                bank.clear_slot(local)
                for name, fill in _LANE_STATS.items():
                    getattr(self, name)[lane] = fill
                self.lane_strategy_state[lane] = 0.0
        table.changes.clear()
        self.state.copy_(torch.from_numpy(table.state))
        self.slot.copy_(torch.from_numpy(table.slot))
        if self._graphs is not None:
            self._graphs.clear()  # every graph reads the lanes as they were
        arrays, self._flags = build_lanes(table, self.chunk_width, self.config,
                                          self._bank_of_lane, list(self.banks), self.alpha.device)
        # (the fused node has no shadow gradient: TRAINING lanes with one take the general path)
        self._flags.fused = self._flags.live and not self._flags.has_through and not (
            self.config.training_task_share and self._flags.has_train) and all(
            self.banks[k]._node for k in self._flags.banks)
        for name, value in arrays.items():
            buf = getattr(self, name)
            buf.copy_(torch.as_tensor(value).to(buf.dtype).view(buf.shape))

    def _bank_slot(self, lane: int) -> tuple[BlueprintBank, int]:
        key = list(self.banks)[int(self._bank_of_lane[lane])]
        start, _ = self.table.lanes[int(key)]
        return self.banks[key], lane - start

    def _command(self, fn: Callable[[], object]) -> object:
        """Run a table command; commit whatever it changed (nothing, when it was refused),
        unless inside `batch()`."""
        try:
            return fn()
        finally:
            if self.table.changes and not self._batching:
                self._commit()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Commands inside the block are committed to the tensors once, at its end (each is
        still checked, and refused, on its own): many germinations cost one commit."""
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            if self.table.changes:
                self._commit()

    # ---------------------------------------------------------------- queries
    def stage_of(self, seed_id: int) -> SeedStage:
        return self.table.stage_of(seed_id)

    def seeds_in(self, *stages: SeedStage) -> list[int]:
        return self.table.seeds_in(*stages)

    def readiness(self) -> dict[int, SeedStage]:
        """Seed -> the transition its gate passed at the last epoch boundary."""
        return dict(self.table.readiness)

    def chunk_size(self, seed_id: int) -> int:
        start, end = self.chunks[self.table.check_seed(seed_id)]
        return end - start

    @property
    def epoch(self) -> int:
        return self.table.epoch

    def params_added(self) -> int:
        """Blueprint parameters currently part of the layer (running or fossilized seeds)."""
        return self.table.params_added()

    @property
    def stage_counts(self) -> dict[str, int]:
        values, counts = np.unique(self.table.state[:, STAGE], return_counts=True)
        return {SeedStage(int(v)).name: int(c) for v, c in zip(values, counts, strict=True)}

    def drain_events(self) -> list[LifecycleEvent]:
        return self.table.drain_events()

    def drain_outcomes(self) -> list[SeedOutcome]:
        return self.table.drain_outcomes()

    def health_report(self) -> LayerHealthReport | None:
        """The report of the last epoch boundary (None before the first)."""
        return self._last_report

    # ---------------------------------------------------------------- commands
    def germinate(self, seed_id: int, blueprint: str | int | BlueprintSpec = "residual_mlp",
                  strategy: str | int = "fixed_ramp") -> None:
        """DORMANT -> GERMINATED with a blueprint; raises a `LifecycleError` when refused."""
        self._command(lambda: self.table.germinate(seed_id, blueprint, strategy))

    def request_germination(self, seed_id: int,
                            blueprint: str | int | BlueprintSpec = "residual_mlp",
                            strategy: str | int = "fixed_ramp") -> bool:
        try:
            self.germinate(seed_id, blueprint, strategy)
        except LifecycleError:
            return False
        return True

    def cancel_germination(self, seed_id: int) -> bool:
        return bool(self._command(lambda: self.table.cancel(seed_id)))

    def transition(self, seed_id: int, stage: SeedStage | int, force: bool = False,
                   reason: str = "command") -> None:
        """Move a seed along the table. Refusals raise a `LifecycleError` (a `ValueError`)
        and change nothing. `force` skips a gate, never the table (except the operator reset
        ROLLED_BACK -> DORMANT, which needs it)."""
        self._command(lambda: self.table.transition(seed_id, stage, force, reason))

    def set_counterfactual(self, seeds: Iterable[int]) -> None:
        """From now on, the given seeds' outputs are not blended in (as if alpha were 0)."""
        self.table.set_counterfactual(seeds)
        self._commit()

    @contextlib.contextmanager
    def counterfactual(self, seeds: Iterable[int]) -> Iterator[None]:
        """Within the block, the given seeds' outputs are not blended in (as if alpha were 0)."""
        previous = self.table.counterfactual
        self.set_counterfactual(previous | set(seeds))
        try:
            yield
        finally:
            self.set_counterfactual(previous)

    def measure_contributions(self, evaluate: Callable[[], float], val_metric: float) -> None:
        """For each EVALUATING seed, one counterfactual pass of `evaluate` (the validation metric
        with that seed at alpha 0); contribution = improvement the seed brings (sign-adjusted)."""
        for seed_id in self.seeds_in(S.EVALUATING):
            with self.counterfactual([seed_id]):
                without = float(evaluate())
            self.table.records[seed_id].contributions.append(
                self.config.sign * (val_metric - without))

    # ---------------------------------------------------------------- epoch boundary
    def end_epoch(self, val_metric: float | None = None) -> LayerHealthReport:
        """Advance EPOCHS_IN_STAGE, roll back seeds that produced non-finite values, return
        CANCELLED and embargo-served CULLED seeds to DORMANT, evaluate gates (see readiness())
        and return this epoch's health report. Statistics are reduced across ranks under
        torch.distributed; one device-to-host transfer."""
        self._last_report = boundary.end_epoch(self, val_metric)
        return self._last_report

    # ---------------------------------------------------------------- checkpoint
    def get_extra_state(self) -> torch.Tensor:
        # JSON bytes in a uint8 tensor: safetensors, save_pretrained and
        # torch.load(weights_only=True) all take a state_dict made only of tensors.
        return torch.frombuffer(bytearray(json.dumps(self.table.to_dict()).encode()),
                                dtype=torch.uint8)

    def set_extra_state(self, extra: torch.Tensor) -> None:
        self._loaded_extra = json.loads(bytes(extra.cpu().numpy().tobytes()).decode())

    def _after_load(self) -> None:
        """After load_state_dict: the table follows the loaded buffers and bookkeeping."""
        if self._loaded_extra is not None:
            self.table.load_dict(self._loaded_extra, self.state.cpu().numpy(),
                                 self.slot.cpu().numpy())
            self._loaded_extra = None
            self._tracking_step = self.table.step % self.config.telemetry_every == 0
        self._commit()

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
        if hasattr(self, "_flags") and self._flags.grafting:
            self._commit()  # the grafting index tensors live on the device too
        elif getattr(self, "_graphs", None) is not None:
            self._graphs.clear()  # a graph reads the addresses of before
        return self


def _after_load_hook(module: KasminaLayer, _keys: object) -> None:
    """A module-level function, not a lambda, so a whole model pickles (torch.save(model))."""
    module._after_load()
