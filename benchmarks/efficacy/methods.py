"""The methods compared on every task: the host alone, the host grown by kasmina's
`LocalController` under a configuration (the library defaults, lifecycle ablations, a candidate
set of defaults), and the controls that need no lifecycle (static-final, insertion, a plain
static model of matched parameters). GroMo lives in gromo_baseline.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from branches import Branch, install
from engine import Hooks, RunRecord, matmul_params, train, trainable
from kasmina import (
    ControllerConfig,
    KasminaConfig,
    LifecycleError,
    LocalController,
    SeedStage,
    get_blueprint,
    host_parameters,
    seed_layers,
    wrap,
)
from kasmina.lifecycle import ACTIVE_STAGES, BLENDING_STAGES
from torch import nn


@dataclass(frozen=True)
class Growth:
    """A seeded method: the library's two configs, and how germination sites are picked."""

    kasmina: KasminaConfig = field(default_factory=KasminaConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    placement: str = "health"  # "health" (the controller's score) or "random"


class RandomPlacement(LocalController):
    """The LocalController with its germination site drawn at random among the dormant seeds of
    layers with spare capacity, instead of the least healthy. ControllerConfig has no knob for
    this (health weights of 0 give index order, not random order): the loop below is the
    controller's `_germinate` with the sort replaced by a shuffle."""

    def __init__(self, model: nn.Module, config: ControllerConfig, seed: int) -> None:
        super().__init__(model, config)
        self.rng = np.random.default_rng(seed)

    def _germinate(self) -> int:
        candidates = [(layer, int(s)) for layer in self.layers
                      if len(layer.seeds_in(*ACTIVE_STAGES)) < layer.config.max_active_seeds
                      for s in layer.seeds_in(SeedStage.DORMANT)]
        done = 0
        for i in self.rng.permutation(len(candidates)):
            if done == self.config.germinations_per_plateau:
                break
            layer, seed_id = candidates[i]
            fitting = [b for b in self.config.blueprints
                       if get_blueprint(b).fits(layer.chunk_size(seed_id))]
            try:
                layer.germinate(seed_id, fitting[0], self.config.strategy)
            except (IndexError, LifecycleError):
                continue
            done += 1
        return done


def adamw(task, host: list[nn.Parameter], branch: list[nn.Parameter], branch_lr: float
          ) -> torch.optim.Optimizer:
    """The host's AdamW (task lr and weight decay); branches as the seeds' own Adam (seed_lr,
    betas (0.9, 0.999), no weight decay), so controls and seeds train grown modules alike."""
    groups = [{"params": host, "lr": task.lr, "weight_decay": task.weight_decay}]
    if branch:
        groups.append({"params": branch, "lr": branch_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


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
    wrap(model, seeds_per_layer=task.seeds_per_layer, config=cfg,
         target_modules=list(task.seed_sites))
    ctl_cfg = dataclasses.replace(growth.controller, mode="min", blueprints=(task.blueprint,))
    ctl = (RandomPlacement(model, ctl_cfg, seed) if growth.placement == "random"
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
    rec.info.update(branches=branches, transitions=ends, seed_lr=cfg.seed_lr)
    return rec


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
            out.append(Branch(layer.layer_id, start, end, spec.hidden,
                              germinated[(layer.layer_id, s)], stage.name))
    return out


def run_branched(task, data, seed: int, method: str, branches: list[Branch], branch_lr: float,
                 from_start: bool) -> RunRecord:
    """static-final (from_start: every branch from epoch 0) or insertion (each at its
    germination epoch)."""
    model = task.build(seed)
    if from_start:
        branches = [Branch(b.site, b.start, b.end, b.hidden, 0, b.final_stage) for b in branches]
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
