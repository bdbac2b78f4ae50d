"""What both trainer callbacks share: the metric direction and the blueprints' parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from ..controller import ControllerConfig
from ..wrap import host_parameters

MODES = ("max", "min")


def with_mode(config: ControllerConfig | None, mode: str) -> ControllerConfig:
    """`config` (default ControllerConfig()) with the monitored metric's direction: the
    callback's `mode` replaces the config's own."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    config = config or ControllerConfig()
    if "mode" in {f.name for f in dataclasses.fields(ControllerConfig)}:
        return dataclasses.replace(config, mode=mode)
    # A ControllerConfig from before `mode` spells the direction as a bool.
    return dataclasses.replace(config, higher_is_better=mode == "max")


def blueprint_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters the seeds' own optimizer steps: all but kasmina.host_parameters."""
    host = {id(p) for p in host_parameters(model)}
    return {id(p) for p in model.parameters() if id(p) not in host}


def blueprint_parameters_in(optimizers: Iterable[torch.optim.Optimizer],
                            model: nn.Module) -> int:
    """How many blueprint parameters the host optimizers hold (a host optimizer must hold
    none: the seeds' own optimizer steps them, and twice stepped is wrong)."""
    blueprint = blueprint_parameter_ids(model)
    return sum(id(p) in blueprint for opt in optimizers for group in opt.param_groups
               for p in group["params"])


def step_loss(losses: list[torch.Tensor]) -> torch.Tensor | None:
    """The loss of one optimizer step from its micro-batches' losses: their sum, as both
    trainers count it (Lightning divides each by accumulate_grad_batches; the HF Trainer logs
    the sum of training_step's returns). No host synchronisation."""
    if not losses:
        return None
    return torch.stack([loss.detach().float().reshape(()) for loss in losses]).sum()
