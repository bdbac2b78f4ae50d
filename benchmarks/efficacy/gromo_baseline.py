"""GroMo (the `gromo` package, TINY's growth: new neurons from the statistics of the loss's
functional gradient) on the MLP tasks, on the same epochs, data order, optimiser and parameter
budget as the grown architecture it is compared with.

The host is rebuilt from GroMo's `LinearGrowingModule`s with the task's activations (identity
for digits' linear host). Growth adds `neurons` per step to one hidden layer, every `every`
epochs from `first` on, until the parameter budget is spent; each step computes the statistics
over the training set, keeps the best `neurons` directions (TINY: no update of the existing
weights), picks the extension's scale by a line search on the training loss, applies it and
re-makes the optimiser. `site` chooses the layer whose width grows: "bottleneck" widens the
layer before the last (digits' rank-4 bottleneck; regression's one hidden layer), "seed" the
first hidden layer, where the seeds sit."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from engine import Hooks, RunRecord, train, trainable
from torch import nn


def available() -> str | None:
    """None when gromo imports, else why not."""
    try:
        import gromo  # noqa: F401
    except ImportError as e:
        return f"gromo is not installed ({e}): pip install './services/kasmina-runtime[bench]'"
    return None


def build(task, seed: int) -> nn.Module:
    from gromo.containers.sequential_growing_container import SequentialGrowingModel
    from gromo.modules.linear_growing_module import LinearGrowingModule

    torch.manual_seed(seed)
    widths = task.widths
    act = nn.ReLU if task.relu else nn.Identity

    class Net(SequentialGrowingModel):
        def __init__(self) -> None:
            super().__init__(widths[0], widths[-1])
            self.layers = nn.ModuleList()
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
                last = i == len(widths) - 2
                self.layers.append(LinearGrowingModule(
                    a, b, post_layer_function=nn.Identity() if last else act(),
                    previous_module=self.layers[-1] if i else None, name=f"layer{i}"))
            self._growable_layers = list(self.layers[1:])
            self.set_growing_layers(scheduling_method="all")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

        def extended_forward(self, x: torch.Tensor, mask: dict | None = None) -> torch.Tensor:
            x_ext = None
            for layer in self.layers:
                x, x_ext = layer.extended_forward(x, x_ext)
            return x

    return Net()


def _sum_loss(task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task.classify:
        return F.cross_entropy(out, y, reduction="sum")
    return F.mse_loss(out.squeeze(-1), y, reduction="sum")


def grow(model: nn.Module, task, data: dict, index: int, neurons: int) -> int:
    """One TINY step on `_growable_layers[index]`; returns the neurons added."""
    x_all, y_all = data["x_tr"], data["y_tr"]
    model.set_growing_layers(index=index)
    model.init_computation()
    model.train()
    for idx in torch.arange(len(y_all)).split(256):
        model.zero_grad()
        _sum_loss(task, model(x_all[idx]), y_all[idx]).backward()
        model.update_computation()
    model.compute_optimal_updates(maximum_added_neurons=neurons, compute_delta=False)
    model.reset_computation()
    model.zero_grad()
    model.select_update(0)
    layer = model.currently_updated_layer
    added = 0 if layer.eigenvalues_extension is None else int(layer.eigenvalues_extension.shape[0])
    if added == 0:
        model.currently_updated_layer.delete_update()
        return 0
    best, best_loss = 0.0, float("inf")
    with torch.no_grad():
        for gamma in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
            model.set_scaling_factor(gamma)
            loss = _sum_loss(task, model.extended_forward(x_all), y_all).item()
            if loss < best_loss:
                best, best_loss = gamma, loss
    model.set_scaling_factor(best)
    model.apply_change()
    return added


def run_gromo(task, data: dict, seed: int, method: str, budget: int, site: str,
              first: int = 10, every: int = 5) -> RunRecord:
    """`budget`: parameters GroMo may add (the grown architecture's), spread evenly over the
    growth steps; growth stops when the next step would exceed it."""
    warnings.filterwarnings("ignore", module="gromo")  # "it is up to the user" size notes
    model = build(task, seed)
    index = len(model._growable_layers) - 1 if site == "bottleneck" else 0
    host_params = trainable(model)
    steps = max(1, len(range(first, task.epochs, every)))
    neurons = max(1, -(-budget // (_cost_per_neuron(task, model, index) * steps)))

    def make_opt() -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=task.weight_decay)

    grown = {"steps": 0, "neurons": 0}
    changed = [False]

    def end_epoch(_val: float, _evaluate) -> None:
        epoch = len(rec.curve) + 1
        if epoch < first or (epoch - first) % every or epoch >= task.epochs:
            return
        before = trainable(model)
        probe = _cost_per_neuron(task, model, index)
        if before - host_params + neurons * probe > budget:
            return
        added = grow(model, task, data, index, neurons)
        grown["steps"] += 1
        grown["neurons"] += added
        changed[0] = added > 0

    def rebuild() -> torch.optim.Optimizer | None:
        if not changed[0]:
            return None
        changed[0] = False
        return make_opt()

    rec = RunRecord(task.name, method, seed)
    hooks = Hooks(end_epoch=end_epoch, rebuild=rebuild,
                  active_params=lambda: sum(m.weight.numel() for m in model.layers))
    train(task, data, model, make_opt(), seed, rec, hooks)
    rec.params = trainable(model)
    rec.params_added = rec.params - host_params
    rec.info.update(gromo=grown, site=site, budget=budget)
    return rec


def _cost_per_neuron(task, model: nn.Module, index: int) -> int:
    """Parameters one neuron adds in the hidden layer before `_growable_layers[index]`: its
    input weights and bias, and its output weights."""
    layer = model._growable_layers[index]
    prev = layer.previous_module
    return prev.in_features + 1 + layer.out_features
