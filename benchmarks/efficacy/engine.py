"""One training loop for every method of a task: the same data order, optimiser and epochs, the
only differences being what grows (a `Grower` at epoch boundaries) and which parameters exist.

Compute is counted two ways: process CPU seconds (one thread) of training, growth and the
validation passes the controller asks for, with the measurement pass of the final metric left
out; and matmul FLOPs (forward 2 per weight in use per sample, training 3x forward: the usual
forward + twice-as-costly backward), counted from the parameters in use at each epoch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class EpochPoint:
    epoch: int  # epochs (or eval intervals) completed
    steps: int
    metric: float  # the task's final metric, measured now
    flops: float  # cumulative
    cpu_s: float  # cumulative


@dataclass
class RunRecord:
    task: str
    method: str
    seed: int
    final: float = float("nan")
    params: int = 0  # trainable parameters in use at the end (host + grown)
    params_added: int = 0
    flops: float = 0.0
    cpu_s: float = 0.0
    curve: list[EpochPoint] = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass
class Hooks:
    """What a method adds to the plain loop."""

    step: Callable[[torch.Tensor], None] | None = None  # after optimizer.step()
    # at a boundary: (val_loss, counted_val_loss_fn) -> None (the controller)
    end_epoch: Callable[[float, Callable[[], float]], None] | None = None
    start_epoch: Callable[[int], None] | None = None  # before an epoch (insertion)
    # matmul parameters in use now (host + running blueprints / active branches)
    active_params: Callable[[], int] | None = None
    # re-make the optimiser after the parameter set changed (GroMo)
    rebuild: Callable[[], torch.optim.Optimizer] | None = None


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matmul_params(model: nn.Module) -> int:
    """Weights of every linear map (frozen ones too: they cost FLOPs)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def train(task, data: dict, model: nn.Module, opt: torch.optim.Optimizer, seed: int,
          record: RunRecord, hooks: Hooks | None = None) -> RunRecord:
    hooks = hooks or Hooks()
    gen = torch.Generator().manual_seed(seed)
    n_train, n_val = task.samples_per_epoch(data), task.val_samples(data)
    host_matmul = matmul_params(model)
    active = hooks.active_params or (lambda: host_matmul)
    flops, cpu, steps = 0.0, 0.0, 0
    epochs = task.epochs
    for epoch in range(epochs):
        t0 = time.process_time()
        if hooks.start_epoch is not None:
            hooks.start_epoch(epoch)
        fwd = task.forward_flops(active())
        model.train()
        for x, y in task.batches(data, gen):
            loss = task.loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if hooks.step is not None:
                hooks.step(loss.detach())
            steps += 1
        flops += 3 * fwd * n_train
        evals = [0]

        def counted_val(evals: list[int] = evals) -> float:
            evals[0] += 1
            return task.val_loss(model, data)

        val = counted_val()
        if hooks.end_epoch is not None:
            hooks.end_epoch(val, counted_val)
        flops += evals[0] * fwd * n_val
        if hooks.rebuild is not None:
            opt = hooks.rebuild() or opt
        cpu += time.process_time() - t0
        model.eval()
        record.curve.append(EpochPoint(epoch + 1, steps, task.metric(model, data), flops, cpu))
    record.final = record.curve[-1].metric
    record.flops, record.cpu_s = flops, cpu
    return record
