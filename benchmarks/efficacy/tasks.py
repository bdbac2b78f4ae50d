"""The two MLP tasks of the harness, on data that ships with scikit-learn.

digits: the demo's bottleneck host (kasmina.recipes.DigitsParams): 64 -> 64 -> 4 -> 10, three
linear layers and no activation (a rank-4 linear classifier); seeds may grow on the first
layer's output, before the bottleneck. Final metric: test accuracy (higher is better).

regression: Friedman #1 (sklearn.datasets.make_friedman1, generated, noise 1.0, 10 inputs of
which 5 matter), a narrow ReLU host 10 -> 32 -> ReLU -> 1; seeds may grow on the
first layer's pre-activation. Final metric: test mean squared error of the standardised target
(lower is better); the controller watches the validation MSE (mode "min").

Every random seed fixes the initialisation and the data order; the split is fixed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MLPTask:
    name: str
    widths: tuple[int, ...]  # host layer widths, input first
    relu: bool  # ReLU between hidden layers (digits' host is linear)
    classify: bool  # cross-entropy + accuracy, else MSE
    epochs: int
    lr: float
    weight_decay: float  # AdamW's, host parameters only
    batch_size: int = 64
    seed_sites: tuple[str, ...] = ("0",)  # the layers seeds may grow on
    seeds_per_layer: int = 8  # kasmina.wrap's default
    blueprint: str = "residual_mlp"

    @property
    def direction(self) -> str:
        return "max" if self.classify else "min"

    @property
    def metric_name(self) -> str:
        return "test accuracy" if self.classify else "test MSE"

    def load(self) -> dict[str, torch.Tensor]:
        from sklearn.model_selection import train_test_split
        if self.classify:
            from sklearn.datasets import load_digits
            x, y = load_digits(return_X_y=True)
            x = (x / 16.0).astype(np.float32)
            strat = y
        else:
            from sklearn.datasets import make_friedman1
            x, y = make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
            x, y = x.astype(np.float32), ((y - y.mean()) / y.std()).astype(np.float32)
            strat = None
        # digits: the recipe's split (1,077 train, 270 validation, 450 test)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0,
                                                  stratify=strat)
        x_tr, x_va, y_tr, y_va = train_test_split(
            x_tr, y_tr, test_size=0.2, random_state=0,
            stratify=y_tr if self.classify else None)
        t = torch.from_numpy
        return {"x_tr": t(x_tr), "y_tr": t(y_tr), "x_va": t(x_va), "y_va": t(y_va),
                "x_te": t(x_te), "y_te": t(y_te)}

    def build(self, seed: int, scale: float = 1.0) -> nn.Module:
        """The host; `scale` widens every hidden layer (the plain static model of matched
        parameters). Seed sites are Sequential indices ("0" is the first linear)."""
        torch.manual_seed(seed)
        widths = [self.widths[0], *(max(1, round(w * scale)) for w in self.widths[1:-1]),
                  self.widths[-1]]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            mods.append(nn.Linear(a, b))
            if self.relu and i < len(widths) - 2:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)

    def batches(self, data: dict[str, torch.Tensor], gen: torch.Generator
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(data["y_tr"])
        for idx in torch.randperm(n, generator=gen).split(self.batch_size):
            yield data["x_tr"][idx], data["y_tr"][idx]

    def samples_per_epoch(self, data: dict[str, torch.Tensor]) -> int:
        return len(data["y_tr"])

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return F.cross_entropy(out, y) if self.classify else F.mse_loss(out.squeeze(-1), y)

    @torch.no_grad()
    def val_loss(self, model: nn.Module, data: dict[str, torch.Tensor]) -> float:
        model.eval()
        return self.loss(model, data["x_va"], data["y_va"]).item()

    def val_samples(self, data: dict[str, torch.Tensor]) -> int:
        return len(data["y_va"])

    @torch.no_grad()
    def metric(self, model: nn.Module, data: dict[str, torch.Tensor]) -> float:
        model.eval()
        out = model(data["x_te"])
        if self.classify:
            return (out.argmax(1) == data["y_te"]).float().mean().item()
        return F.mse_loss(out.squeeze(-1), data["y_te"]).item()

    def forward_flops(self, matmul_params: int) -> float:
        """Forward FLOPs per sample: 2 per weight (multiply-add) of every linear map in use."""
        return 2.0 * matmul_params


DIGITS = MLPTask("digits", (64, 64, 4, 10), relu=False, classify=True, epochs=80, lr=3e-3,
                 weight_decay=1.0)
REGRESSION = MLPTask("regression", (10, 32, 1), relu=True, classify=False, epochs=60,
                     lr=3e-3, weight_decay=1e-4)
