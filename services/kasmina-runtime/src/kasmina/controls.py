"""Controls for a grown architecture (issue 17): the modules the seeds grew, as plain branches
on chunks of a linear layer's output, with no lifecycle (no reconstruction phase, ramp, gates or
seed optimiser of their own): a branch is either absent or fully in.

static-final: every branch in from step 0 (the grown architecture trained from scratch).
insertion: each branch switched in at the epoch its seed germinated in the grown run.

A branch computes its blueprint's function (kasmina.blueprints, the catalog's maths) and starts
as the identity, so it changes nothing when it appears: a residual kind's output parameters are
0 (residual_mlp `h + W2 gelu(W1 h + b1) + b2` with W2 = 0, b2 = 0), a linear one is W = I,
b = 0. The other parameters are drawn uniform(±1/sqrt(fan_in)) as the seeds' banks draw them,
from one generator per layer in branch order. Used by `make run` (kasmina.fleet_run) and the
efficacy harness (benchmarks/efficacy)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .blueprints import KINDS, forward_of, get_blueprint
from .host import split_chunks
from .lifecycle import BLENDING_STAGES, SeedStage


@dataclass(frozen=True)
class Branch:
    """One grown module: where it sits, what it is, and when its seed germinated."""

    site: str  # path of the seeded linear layer in the model
    start: int  # the chunk [start, end) of the layer's output
    end: int
    blueprint: str  # its catalog name (kasmina.get_blueprint)
    insert_epoch: int = 0  # epochs completed before the branch is in (0: from the start)
    final_stage: str = ""  # where the seed ended in the grown run (for the report)

    @property
    def params(self) -> int:
        return get_blueprint(self.blueprint).param_count(self.end - self.start)

    def from_start(self) -> Branch:
        return Branch(self.site, self.start, self.end, self.blueprint, 0, self.final_stage)


def _identity_init(blueprint: str, chunk: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    spec = get_blueprint(blueprint)
    kind = KINDS[spec.kind]
    fan_in = kind.fan_in(spec, chunk)
    residual = any(p.output for p in kind.parameters)
    out = {}
    for p, (name, shape) in zip(kind.parameters, kind.shapes(spec, chunk).items(), strict=True):
        if residual and p.output:
            out[name] = torch.zeros(shape)
        elif not residual:  # a non-residual kind (linear): the identity map
            out[name] = torch.eye(chunk) if len(shape) == 2 else torch.zeros(shape)
        else:
            bound = 1.0 / math.sqrt(fan_in[name])
            out[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return out


class BranchedLinear(nn.Module):
    def __init__(self, host: nn.Module, branches: list[Branch], seed: int) -> None:
        super().__init__()
        self.host = host
        self.branches = sorted(branches, key=lambda b: b.start)
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ModuleList()
        for b in self.branches:
            self.weights.append(nn.ParameterDict(
                {k: nn.Parameter(v) for k, v in _identity_init(b.blueprint, b.end - b.start,
                                                                gen).items()}))
        self._forwards = [forward_of(get_blueprint(b.blueprint)) for b in self.branches]
        self.active = [b.insert_epoch == 0 for b in self.branches]

    def start_epoch(self, epoch: int) -> None:
        """Switch in the branches whose insertion epoch has come (epochs counted from 0)."""
        self.active = [a or b.insert_epoch <= epoch for a, b in zip(self.active, self.branches,
                                                                    strict=True)]

    def branch_parameters(self) -> list[nn.Parameter]:
        return [p for w in self.weights for p in w.values()]

    def active_params(self) -> int:
        return sum(b.params for b, a in zip(self.branches, self.active, strict=True) if a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)  # (..., F)
        if not any(self.active):
            return h
        parts, last = [], 0
        for b, on, w, fwd in zip(self.branches, self.active, self.weights, self._forwards,
                                 strict=True):
            if not on:
                continue
            c = h[..., b.start:b.end]  # (..., C)
            y = fwd({k: v.unsqueeze(0) for k, v in w.items()}, c.reshape(1, -1, c.shape[-1]))
            parts += [h[..., last:b.start], y.view_as(c)]  # (1, N, C) -> (..., C)
            last = b.end
        parts.append(h[..., last:])
        return torch.cat(parts, dim=-1)


def install(model: nn.Module, branches: Iterable[Branch], seed: int) -> list[BranchedLinear]:
    """Replace each seed site named in `branches` by a BranchedLinear, in place."""
    by_site: dict[str, list[Branch]] = {}
    for b in branches:
        by_site.setdefault(b.site, []).append(b)
    layers = []
    for k, (site, group) in enumerate(sorted(by_site.items())):
        parent_path, _, name = site.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = BranchedLinear(getattr(parent, name), group, seed * 1000 + k)
        setattr(parent, name, layer)
        layers.append(layer)
    return layers


def branch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every installed branch's parameters (the seeds' optimiser's share in a grown run)."""
    return [p for m in model.modules() if isinstance(m, BranchedLinear)
            for p in m.branch_parameters()]


def control_optimizer(host: list[nn.Parameter], branches: list[nn.Parameter], lr: float,
                      weight_decay: float, branch_lr: float) -> torch.optim.Optimizer:
    """The host's AdamW (its lr and weight decay); branches as the seeds' own Adam (seed lr,
    betas (0.9, 0.999), no weight decay), so controls and seeds train grown modules alike."""
    groups = [{"params": host, "lr": lr, "weight_decay": weight_decay}]
    if branches:
        groups.append({"params": branches, "lr": branch_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


class InsertionSchedule:
    """A `Grower` (kasmina.recipes) that only switches branches in: after each epoch, the
    branches due for the next one."""

    def __init__(self, layers: list[BranchedLinear]) -> None:
        self.layers, self.epochs = layers, 0

    def step(self, loss: object = None) -> None:
        pass

    def end_epoch(self, val_metric: float, evaluate: Callable[[], float] | None = None) -> None:
        self.epochs += 1
        for layer in self.layers:
            layer.start_epoch(self.epochs)


def branches_from_health(reports: Iterable) -> list[Branch]:
    """The grown architecture from a job's health reports (kasmina.seeds.v1.LayerHealthReport,
    in epoch order): every seed blended in at the last report (GRAFTING .. FOSSILIZED), with the
    epochs completed when its last germination was applied (the epoch of the first report that
    shows it GERMINATED: commands apply before the boundary's report)."""
    from oona.contracts import stage_from_wire  # the fleet's side: it needs oona

    last: dict[str, object] = {}
    germinated: dict[tuple[str, int], int] = {}
    previous: dict[tuple[str, int], SeedStage] = {}
    for r in reports:
        last[r.layer_id] = r
        for seed, wire in enumerate(r.stage):
            stage = SeedStage(stage_from_wire(wire))
            if stage is SeedStage.GERMINATED and previous.get((r.layer_id, seed)) is not stage:
                germinated[(r.layer_id, seed)] = r.epoch
            previous[(r.layer_id, seed)] = stage
    out = []
    for layer_id, r in last.items():
        bounds = split_chunks(r.features, r.num_seeds)
        for seed, wire in enumerate(r.stage):
            stage = SeedStage(stage_from_wire(wire))
            if stage in BLENDING_STAGES:
                out.append(Branch(layer_id, *bounds[seed], get_blueprint(r.blueprint_id[seed]).name,
                                  germinated.get((layer_id, seed), 0), stage.name))
    return out
