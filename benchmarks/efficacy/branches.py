"""Plain-PyTorch controls for grown architectures: a linear layer with residual-MLP branches on
chunks of its output, each the same function as the catalog's `residual_mlp` blueprint at alpha 1
(`h + W2 gelu(W1 h + b1) + b2`), identity-initialised (W2 = 0, b2 = 0) so a branch changes
nothing when it appears. No lifecycle: a branch is either absent or fully in.

static-final: every branch in from step 0. insertion: each branch switched in at the epoch its
seed germinated in the grown run (`insert_epoch`), then trained like the host."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Branch:
    """One grown module: where it sits and when its seed germinated."""

    site: str  # path of the seeded linear layer in the model
    start: int  # the chunk [start, end) of the layer's output
    end: int
    hidden: int
    insert_epoch: int = 0  # epochs completed before the branch is in (0: from the start)
    final_stage: str = ""  # where the seed ended in the grown run (for the report)

    @property
    def params(self) -> int:
        c = self.end - self.start
        return c * self.hidden + self.hidden + self.hidden * c + c


class BranchedLinear(nn.Module):
    def __init__(self, host: nn.Linear, branches: list[Branch], seed: int) -> None:
        super().__init__()
        self.host = host
        self.branches = list(branches)
        self.w1, self.b1, self.w2, self.b2 = (nn.ParameterList() for _ in range(4))
        gen = torch.Generator().manual_seed(seed)
        for b in self.branches:
            c = b.end - b.start
            bound = 1.0 / math.sqrt(c)  # nn.Linear's (and the blueprint bank's) fan-in bound
            self.w1.append(nn.Parameter((torch.rand(c, b.hidden, generator=gen) * 2 - 1) * bound))
            self.b1.append(nn.Parameter((torch.rand(b.hidden, generator=gen) * 2 - 1) * bound))
            self.w2.append(nn.Parameter(torch.zeros(b.hidden, c)))
            self.b2.append(nn.Parameter(torch.zeros(c)))
        self.active = [b.insert_epoch == 0 for b in self.branches]

    def start_epoch(self, epoch: int) -> None:
        """Switch in the branches whose insertion epoch has come (epochs counted from 0)."""
        self.active = [a or b.insert_epoch <= epoch for a, b in zip(self.active, self.branches,
                                                                    strict=True)]

    def branch_parameters(self) -> list[nn.Parameter]:
        return [*self.w1, *self.b1, *self.w2, *self.b2]

    def active_params(self) -> int:
        return sum(b.params for b, a in zip(self.branches, self.active, strict=True) if a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)  # (..., F)
        if not any(self.active):
            return h
        if len(self.branches) == 1 and self.branches[0].start == 0 and (
                self.branches[0].end == h.shape[-1]):  # one branch over every feature
            return h + F.gelu(h @ self.w1[0] + self.b1[0]) @ self.w2[0] + self.b2[0]
        parts, last = [], 0
        for i, (b, on) in enumerate(zip(self.branches, self.active, strict=True)):
            if not on:
                continue
            c = h[..., b.start:b.end]  # (..., C)
            parts += [h[..., last:b.start],
                      c + F.gelu(c @ self.w1[i] + self.b1[i]) @ self.w2[i] + self.b2[i]]
            last = b.end
        parts.append(h[..., last:])
        return torch.cat(parts, dim=-1)


def install(model: nn.Module, branches: list[Branch], seed: int) -> list[BranchedLinear]:
    """Replace each seed site named in `branches` by a BranchedLinear, in place."""
    by_site: dict[str, list[Branch]] = {}
    for b in branches:
        by_site.setdefault(b.site, []).append(b)
    layers = []
    for k, (site, group) in enumerate(sorted(by_site.items())):
        parent_path, _, name = site.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        group = sorted(group, key=lambda b: b.start)
        layer = BranchedLinear(getattr(parent, name), group, seed * 1000 + k)
        setattr(parent, name, layer)
        layers.append(layer)
    return layers
