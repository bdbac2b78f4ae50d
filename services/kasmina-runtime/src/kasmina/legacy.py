"""The single-seed layer's API as migrating teams wrote it, kept working (DESIGN §9).

`MorphogeneticLayer(host, blueprint, config)` is a legacy `KasminaLayer` (one seed over the
whole layer, the short lifecycle), so `wrap`, the controllers, checkpoints and
`python -m kasmina migrate` take it as one. Its old names each warn once per call site with a
`DeprecationWarning` naming the replacement and the release it goes away in, then make the
new call:

    MorphogeneticLayer(host, bp, cfg) KasminaLayer(host, 1, KasminaConfig(execution_path="legacy"))
    layer.germinate_seed(bp)          layer.germinate(0, bp)
    layer.graft()                     layer.transition(0, SeedStage.GRAFTING)
    layer.fossilize()                 layer.transition(0, SeedStage.FOSSILIZED)
    layer.cull()                      layer.transition(0, SeedStage.CULLED)
    layer.get_telemetry()             layer.end_epoch(...) returns a LayerHealthReport

docs/migration.md has the before/after code.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from .blueprints import BlueprintSpec
from .config import KasminaConfig
from .layer import KasminaLayer
from .lifecycle import SeedStage

# The release that deprecates the old API (pyproject's version) and the one that removes it.
DEPRECATED_SINCE, REMOVED_IN = "0.1", "1.0"
S = SeedStage


def deprecated(old: str, new: str) -> None:
    """Warn that `old` goes away, naming `new`; at the caller's caller (the user's line)."""
    warnings.warn(f"{old} is deprecated since kasmina {DEPRECATED_SINCE} and will be removed in "
                  f"{REMOVED_IN}; use {new}", DeprecationWarning, stacklevel=3)


class MorphogeneticLayer(KasminaLayer):
    """One seed over the whole of `host`, growing `blueprint` (the default for
    `germinate_seed`) through DORMANT, GERMINATED, GRAFTING, FOSSILIZED or CULLED."""

    def __init__(self, host: nn.Module, blueprint: str | int | BlueprintSpec = "residual_mlp",
                 config: KasminaConfig | None = None, layer_id: str = "") -> None:
        deprecated("MorphogeneticLayer",
                   "KasminaLayer(host, 1, KasminaConfig(execution_path='legacy'))")
        cfg = dataclasses.replace(config or KasminaConfig(), execution_path="legacy")
        super().__init__(host, 1, cfg, layer_id)
        self.blueprint = blueprint

    def germinate_seed(self, blueprint: str | int | BlueprintSpec | None = None) -> None:
        deprecated("MorphogeneticLayer.germinate_seed", "KasminaLayer.germinate(0, blueprint)")
        self.germinate(0, self.blueprint if blueprint is None else blueprint)

    def graft(self) -> None:
        deprecated("MorphogeneticLayer.graft", "KasminaLayer.transition(0, SeedStage.GRAFTING)")
        self.transition(0, S.GRAFTING)

    def fossilize(self) -> None:
        deprecated("MorphogeneticLayer.fossilize",
                   "KasminaLayer.transition(0, SeedStage.FOSSILIZED)")
        self.transition(0, S.FOSSILIZED)

    def cull(self) -> None:
        deprecated("MorphogeneticLayer.cull", "KasminaLayer.transition(0, SeedStage.CULLED)")
        self.transition(0, S.CULLED)

    def get_telemetry(self) -> dict[str, float | int | str]:
        """This epoch's in-process telemetry so far (the statistics `end_epoch` reports, read
        without ending the epoch: one device read; this process's batches only under DDP).
        NaN: not measured yet."""
        deprecated("MorphogeneticLayer.get_telemetry",
                   "the LayerHealthReport that KasminaLayer.end_epoch returns")
        with torch.no_grad():  # not a decorator: its frame would take the warning's stack level
            stats = {k: float(v[0]) for k, v in self.telemetry.summarize().items()}
        lane = int(self.table.slot[0])
        lanes = {"reconstruction_ratio": self.lane_recon, "grad_norm": self.lane_grad_norm,
                 "drift": self.lane_drift}
        for name, values in lanes.items():
            stats[name] = float(values[lane]) if lane >= 0 else math.nan
        return {"stage": self.stage_of(0).name, "epoch": self.epoch, "step": self.table.step,
                "alpha": float(self.alpha[0]), **stats}
