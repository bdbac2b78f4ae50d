"""The methods compared on every task: the host alone, the host grown by kasmina's
`LocalController` under a configuration (the library defaults, lifecycle ablations, a candidate
set of defaults), and the controls that need no lifecycle (static-final, insertion, a plain
static model of matched parameters). GroMo lives in gromo_baseline.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from engine import Hooks, RunRecord, matmul_params, train, trainable
from kasmina import (
    ControllerConfig,
    KasminaConfig,
    LocalController,
    SeedStage,
    get_blueprint,
    host_parameters,
    register_blueprint,
    seed_layers,
    wrap,
)
from kasmina.controls import Branch, control_optimizer, install
from kasmina.lifecycle import ACTIVE_STAGES, BLENDING_STAGES
from torch import nn


@dataclass(frozen=True)
class Growth:
    """A seeded method: the library's two configs, and how germination sites are picked."""

    kasmina: KasminaConfig = field(default_factory=KasminaConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    # "health" (the controller's score), "random", "gradient" (ControllerConfig.placement) or
    # "saliency" (SaliencyPlacement)
    placement: str = "health"
    # Two knobs the library lacks, emulated here (plan.EXTRAS): the blueprint's init
    # ("": as catalogued, fan_in_uniform) and a plateau threshold relative to the best metric
    # (0: min_delta is absolute, as in the controller).
    init: str = ""
    min_delta_rel: float = 0.0
    # Seeds per seed layer (0: the task's, wrap's default 8 on the MLP tasks); more seeds than
    # the run grows make a tight budget (plan.change_set's term seeds_per_layer=N).
    seeds_per_layer: int = 0
    # The blueprint the seeds grow ("": the task's; charlm's is its own 256-hidden spec, the
    # MLP tasks' the catalog's residual_mlp): plan.change_set's term blueprint='name'.
    blueprint: str = ""


class RandomPlacement(LocalController):
    """The LocalController with its germination sites in random order among the dormant seeds
    of layers with spare capacity, instead of least healthy first. ControllerConfig has no knob
    for this (health weights of 0 give index order, not random order)."""

    def __init__(self, model: nn.Module, config: ControllerConfig, seed: int) -> None:
        super().__init__(model, config)
        self.rng = np.random.default_rng(seed)

    def _germination_sites(self) -> list:
        sites = [(layer, int(s)) for layer in self.layers
                 if len(layer.seeds_in(*ACTIVE_STAGES)) < layer.config.max_active_seeds
                 for s in layer.seeds_in(SeedStage.DORMANT)]
        return [sites[i] for i in self.rng.permutation(len(sites))]


class SaliencyPlacement(LocalController):
    """placement="gradient" with another score: each output feature's |g * out| summed over
    the epoch's training steps (the first-order loss change were the feature's output moved
    to 0) instead of the layer's g^2 (KasminaConfig.track_output_gradient, the library's)."""

    def __init__(self, model: nn.Module, config: ControllerConfig) -> None:
        super().__init__(model, config)
        self._sums: dict[int, torch.Tensor] = {}  # this epoch's, per layer (id)
        self._seen: dict[int, torch.Tensor] = {}  # the epoch's before the boundary
        for layer in self.layers:
            layer.register_forward_hook(self._watch)

    def _watch(self, layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not (layer.training and torch.is_grad_enabled() and out.requires_grad):
            return
        act = out.detach()

        def accumulate(grad: torch.Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1]).double()
            v = (g * act.reshape(-1, act.shape[-1]).double()).abs().sum(0)
            old = self._sums.get(id(layer))
            self._sums[id(layer)] = v if old is None else old + v

        out.register_hook(accumulate)

    def end_epoch(self, val_metric: float | None, evaluate=None) -> list:  # noqa: ANN001
        self._seen, self._sums = self._sums, {}
        return super().end_epoch(val_metric, evaluate)

    def _germination_sites(self) -> list:
        def key(site: tuple) -> tuple[int, float]:  # measured first, largest first
            layer, seed = site
            sums = self._seen.get(id(layer))
            start, end = layer.chunks[seed]
            return (1, 0.0) if sums is None else (0, -float(sums[start:end].mean()))
        return sorted(super()._germination_sites(), key=key)  # stable: health order in ties


class RelativePlateau(LocalController):
    """The LocalController with a plateau threshold of `rel` times the best metric so far:
    ControllerConfig.min_delta is in the metric's units, and has no relative form."""

    def __init__(self, model: nn.Module, config: ControllerConfig, rel: float) -> None:
        super().__init__(model, config)
        self.rel = rel

    def _plateaued(self, metric: float) -> bool:
        if self.best is not None:
            self.config = dataclasses.replace(self.config, min_delta=self.rel * abs(self.best))
        return super()._plateaued(metric)


def variant(name: str, init: str) -> str:
    """A catalogued blueprint with another init, registered under a name of its own (its seeds
    grow in the catalogued blueprint's bank: same kind and sizes)."""
    spec = get_blueprint(name)
    return register_blueprint(dataclasses.replace(
        spec, name=f"{spec.name}@{init}", id=spec.id + 1000, init=init)).name


def adamw(task, host: list[nn.Parameter], branch: list[nn.Parameter], branch_lr: float
          ) -> torch.optim.Optimizer:
    """The host's AdamW at the task's lr and weight decay, branches as the seeds' own Adam."""
    return control_optimizer(host, branch, task.lr, task.weight_decay, branch_lr)


def run_host(task, data, seed: int, method: str = "host", scale: float = 1.0) -> RunRecord:
    model = task.build(seed, scale)
    opt = adamw(task, [p for p in model.parameters() if p.requires_grad], [], 0.0)
    rec = train(task, data, model, opt, seed, RunRecord(task.name, method, seed))
    rec.params = trainable(model)
    rec.info["scale"] = scale
    return rec


def run_seeded(task, data, seed: int, method: str, growth: Growth) -> RunRecord:
    model = task.build(seed)
    cfg = growth.kasmina.replace(mode="min")  # the controller watches validation loss
    blueprint = growth.blueprint or task.blueprint
    if growth.init:  # only the catalogued blueprint's bank, which the variant's seeds use
        blueprint, cfg = variant(blueprint, growth.init), cfg.replace(blueprints=(blueprint,))
    wrap(model, seeds_per_layer=growth.seeds_per_layer or task.seeds_per_layer, config=cfg,
         target_modules=list(task.seed_sites))
    ctl_cfg = dataclasses.replace(growth.controller, mode="min", blueprints=(blueprint,))
    if growth.placement not in ("health", "random", "gradient", "saliency"):
        raise ValueError(f"unknown placement {growth.placement!r}")
    if growth.placement != "health" and growth.min_delta_rel:
        raise ValueError(f"{growth.placement} placement with a relative min_delta is not "
                         "implemented")
    ctl = (RandomPlacement(model, ctl_cfg, seed) if growth.placement == "random"
           else SaliencyPlacement(model, ctl_cfg) if growth.placement == "saliency"
           else LocalController(model, dataclasses.replace(ctl_cfg, placement="gradient"))
           if growth.placement == "gradient"
           else RelativePlateau(model, ctl_cfg, growth.min_delta_rel) if growth.min_delta_rel
           else LocalController(model, ctl_cfg))
    layers = seed_layers(model)
    host_matmul = matmul_params(model)
    opt = adamw(task, [p for p in host_parameters(model) if p.requires_grad], [], 0.0)
    hooks = Hooks(step=ctl.step,
                  end_epoch=lambda val, evaluate: ctl.end_epoch(val, evaluate=evaluate),
                  active_params=lambda: host_matmul + sum(la.params_added() for la in layers))
    rec = train(task, data, model, opt, seed, RunRecord(task.name, method, seed), hooks)
    branches = grown_branches(layers, ctl)
    rec.params_added = sum(b.params for b in branches)
    rec.params = trainable(model) - sum(p.numel() for la in layers
                                        for p in la.blueprint_parameters()) + rec.params_added
    ends = {}
    for e in ctl.events:
        ends[e.to_stage.name] = ends.get(e.to_stage.name, 0) + 1
    # The budget: distinct seed slots ever germinated, of all the seed layers' slots.
    slots_germinated = len({(e.layer_id, e.seed_id) for e in ctl.events
                            if e.to_stage is SeedStage.GERMINATED})
    rec.info.update(branches=branches, transitions=ends, seed_lr=cfg.seed_lr,
                    slots=sum(la.num_seeds for la in layers), slots_germinated=slots_germinated,
                    germinated_branches=germinated_branches(layers, ctl, blueprint))
    return rec


def germinated_branches(layers, ctl: LocalController, blueprint: str) -> list[Branch]:
    """Every chunk the run ever germinated, culled or not, at its first germination epoch:
    insertion without the lifecycle's selection (`insertion_all`)."""
    first = {}
    for e in ctl.events:
        if e.to_stage is SeedStage.GERMINATED:
            first.setdefault((e.layer_id, e.seed_id), e.epoch)
    return [Branch(layer.layer_id, *layer.chunks[s], blueprint, first[(layer.layer_id, s)],
                   layer.stage_of(s).name)
            for layer in layers for s in range(layer.num_seeds) if (layer.layer_id, s) in first]


def grown_branches(layers, ctl: LocalController) -> list[Branch]:
    """The grown architecture: every seed whose blueprint is blended in at the end
    (GRAFTING .. FOSSILIZED), with the epoch it (last) germinated at."""
    germinated = {}
    for e in ctl.events:
        if e.to_stage is SeedStage.GERMINATED:
            germinated[(e.layer_id, e.seed_id)] = e.epoch
    out = []
    for layer in layers:
        for s in range(layer.num_seeds):
            stage = layer.stage_of(s)
            if stage not in BLENDING_STAGES:
                continue
            spec = get_blueprint(int(layer.state[s, 1]))
            start, end = layer.chunks[s]
            out.append(Branch(layer.layer_id, start, end, spec.name,
                              germinated[(layer.layer_id, s)], stage.name))
    return out


def run_branched(task, data, seed: int, method: str, branches: list[Branch], branch_lr: float,
                 from_start: bool) -> RunRecord:
    """static-final (from_start: every branch from epoch 0) or insertion (each at its
    germination epoch)."""
    model = task.build(seed)
    if from_start:
        branches = [b.from_start() for b in branches]
    layers = install(model, branches, seed)
    extra = {id(p) for la in layers for p in la.branch_parameters()}
    host = [p for p in model.parameters() if p.requires_grad and id(p) not in extra]
    opt = adamw(task, host, [p for la in layers for p in la.branch_parameters()], branch_lr)
    host_matmul = matmul_params(model)

    def start_epoch(epoch: int) -> None:
        for la in layers:
            la.start_epoch(epoch)

    hooks = Hooks(start_epoch=start_epoch,
                  active_params=lambda: host_matmul + sum(la.active_params() for la in layers))
    rec = train(task, data, model, opt, seed, RunRecord(task.name, method, seed), hooks)
    rec.params_added = sum(la.active_params() for la in layers)
    rec.params = sum(p.numel() for p in host) + rec.params_added
    rec.info["branches"] = branches
    return rec


def matched_scale(task, target_params: int, seed: int) -> float:
    """The hidden-width scale whose host has the parameter count nearest `target_params`."""
    best, best_gap = 1.0, abs(trainable(task.build(seed)) - target_params)
    for scale in np.arange(1.0, 12.0, 0.125):
        gap = abs(trainable(task.build(seed, float(scale))) - target_params)
        if gap < best_gap:
            best, best_gap = float(scale), gap
    return best
