"""`DualPathLayer`: one host layer with both execution paths (DESIGN §9), the migration's unit.

The legacy path (one seed over the whole layer, the short lifecycle: `KasminaLayer` with
`execution_path="legacy"`) and the chunked path (`num_seeds` seeds, the 11-stage lifecycle)
share the host and its output: forward is `chunked(legacy(host(x)))`. One path is active: it
takes the commands, the steps and the epoch boundaries, and reports. The other is frozen: its
parameters, buffers and table do not change, and only its FOSSILIZED growth (final by DESIGN
§3.2) stays in the function. Both parameter sets exist from construction, so DDP, optimizers
and `torch.compile` never see the set change.

A switch (`request_path`) happens at an epoch boundary: at once when no step was reported since
the last one (a job choosing its path at start), else at the end of the next `end_epoch`; the
boundary's report is then the joining path's. Leaving the chunked path (a rollback) ends its
growing seeds (CANCELLED or ROLLED_BACK), so the output is the host's plus fossilized growth,
exactly. The legacy path is left only once its seed is not growing (the short lifecycle's only
failure is terminal): the request waits for a boundary where it is DORMANT, FOSSILIZED or
CULLED. Switching back restores the frozen path as it was left, bit for bit (its epoch, step and
last metric follow the job's). The frozen path's fossilized blueprints get gradients from the
backward; they are dropped at every step, never applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from . import boundary
from .blueprints import BlueprintSpec
from .config import KasminaConfig
from .events import LifecycleEvent, SeedOutcome
from .host import hook_in_eval
from .layer import KasminaLayer
from .lifecycle import ACTIVE_STAGES, SeedStage
from .telemetry import LayerHealthReport

PATHS = ("chunked", "legacy")
S = SeedStage


class DualPathLayer(nn.Module):
    def __init__(self, host: nn.Module, num_seeds: int, config: KasminaConfig | None = None,
                 layer_id: str = "") -> None:
        super().__init__()
        cfg = config or KasminaConfig()
        self.legacy = KasminaLayer(host, 1, dataclasses.replace(cfg, execution_path="legacy"),
                                   layer_id)
        self.chunked = KasminaLayer(host, num_seeds,
                                    dataclasses.replace(cfg, execution_path="chunked"), layer_id)
        self._path = cfg.execution_path
        self._pending: str | None = None
        self._stepped = False  # a step was reported since the last boundary
        self.frozen._tracking_step = False
        self.train(host.training)
        # after the paths' own load hooks (which restore their telemetry clocks)
        self.register_load_state_dict_post_hook(_freeze_after_load)

    # ---------------------------------------------------------------- the two paths
    @property
    def active(self) -> KasminaLayer:
        return self.legacy if self._path == "legacy" else self.chunked

    @property
    def frozen(self) -> KasminaLayer:
        return self.chunked if self._path == "legacy" else self.legacy

    @property
    def execution_path(self) -> str:
        return self._path

    @property
    def pending_path(self) -> str | None:
        """The path requested for the next boundary, if any."""
        return self._pending

    def request_path(self, path: str) -> None:
        """Switch to `path` ("legacy" or "chunked") at an epoch boundary: now when no step was
        reported since the last one, else at the end of the next `end_epoch`."""
        if path not in PATHS:
            raise ValueError(f"execution path must be one of {PATHS}, got {path!r}")
        self._pending = None if path == self._path else path
        if self._pending and not self._stepped and self._can_leave():
            self._switch()

    def _can_leave(self) -> bool:
        return self._path == "chunked" or not self.legacy.seeds_in(*ACTIVE_STAGES)

    def _switch(self) -> None:
        leaving, path = self.active, self._pending
        reason = f"execution path switched to {path}"
        with leaving.batch():
            for seed in leaving.seeds_in(*ACTIVE_STAGES):  # the chunked path's (a rollback)
                if leaving.stage_of(seed) is S.GERMINATED:
                    leaving.cancel_germination(seed)
                else:
                    leaving.transition(seed, S.ROLLED_BACK, reason=reason)
        self._path, self._pending = path, None
        joining, table = self.active, self.active.table
        table.epoch, table.step = leaving.table.epoch, leaving.table.step
        table.last_metric, table.readiness = leaving.table.last_metric, {}
        joining._tracking_step = table.step % joining.config.telemetry_every == 0
        leaving._tracking_step = False

    # ---------------------------------------------------------------- drop-in surface
    @property
    def host(self) -> nn.Module:
        return self.chunked.host

    @property
    def weight(self) -> torch.Tensor:
        return self.host.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.host.bias

    @property
    def layer_id(self) -> str:
        return self.chunked.layer_id

    @layer_id.setter
    def layer_id(self, value: str) -> None:
        self.legacy.layer_id = self.chunked.layer_id = value

    @property
    def config(self) -> KasminaConfig:
        return self.active.config

    @config.setter
    def config(self, value: KasminaConfig) -> None:  # a controller sets its metric's mode
        for layer in (self.legacy, self.chunked):
            layer.config = dataclasses.replace(value, execution_path=layer.execution_path)

    def train(self, mode: bool = True) -> DualPathLayer:
        super().train(mode)
        hook_in_eval(self, mode)
        return self

    def set_telemetry_every(self, every: int) -> None:
        """Both paths' cadence; only the active one tracks (KasminaLayer.set_telemetry_every)."""
        for layer in (self.legacy, self.chunked):
            layer.set_telemetry_every(every)
        for layer in (self.legacy, self.chunked):
            if layer is not self.active:
                layer._tracking_step = False

    @property
    def num_seeds(self) -> int:
        return self.active.num_seeds

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return self.active.chunks

    @property
    def in_features(self) -> int:
        return self.chunked.in_features

    @property
    def out_features(self) -> int:
        return self.chunked.out_features

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id!r}, execution_path={self._path!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chunked.seed_forward(self.legacy.seed_forward(self.host(x)))

    # ---------------------------------------------------------------- the active path
    @property
    def epoch(self) -> int:
        return self.active.epoch

    @property
    def promotion_stage(self) -> SeedStage:
        return self.active.promotion_stage

    @property
    def stage_counts(self) -> dict[str, int]:
        return self.active.stage_counts

    def stage_of(self, seed_id: int) -> SeedStage:
        return self.active.stage_of(seed_id)

    def seeds_in(self, *stages: SeedStage) -> list[int]:
        return self.active.seeds_in(*stages)

    def readiness(self) -> dict[int, SeedStage]:
        return self.active.readiness()

    def chunk_size(self, seed_id: int) -> int:
        return self.active.chunk_size(seed_id)

    def params_added(self) -> int:
        return self.legacy.params_added() + self.chunked.params_added()

    def health_report(self) -> LayerHealthReport | None:
        return self.active.health_report()

    def drain_events(self) -> list[LifecycleEvent]:
        return self.legacy.drain_events() + self.chunked.drain_events()

    def drain_outcomes(self) -> list[SeedOutcome]:
        return self.legacy.drain_outcomes() + self.chunked.drain_outcomes()

    def blueprint_parameters(self) -> list[nn.Parameter]:
        return self.legacy.blueprint_parameters() + self.chunked.blueprint_parameters()

    def germinate(self, seed_id: int, blueprint: str | int | BlueprintSpec = "residual_mlp",
                  strategy: str | int = "fixed_ramp") -> None:
        self.active.germinate(seed_id, blueprint, strategy)

    def request_germination(self, seed_id: int,
                            blueprint: str | int | BlueprintSpec = "residual_mlp",
                            strategy: str | int = "fixed_ramp") -> bool:
        return self.active.request_germination(seed_id, blueprint, strategy)

    def cancel_germination(self, seed_id: int) -> bool:
        return self.active.cancel_germination(seed_id)

    def transition(self, seed_id: int, stage: SeedStage | int, force: bool = False,
                   reason: str = "command") -> None:
        self.active.transition(seed_id, stage, force, reason)

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return self.active.batch()

    def set_counterfactual(self, seeds: Iterable[int]) -> None:
        self.active.set_counterfactual(seeds)

    @contextlib.contextmanager
    def counterfactual(self, seeds: Iterable[int]) -> Iterator[None]:
        with self.active.counterfactual(seeds):
            yield

    def step(self, loss: torch.Tensor | float | None = None,
             scaler: torch.amp.GradScaler | None = None) -> None:
        self._stepped = True
        self.active.step(loss, scaler)
        for bank in self.frozen.banks.values():  # a frozen fossil's gradient is never applied
            bank.flat.grad = None

    def measure_contributions(self, evaluate: Callable[[], float], val_metric: float) -> None:
        self.active.measure_contributions(evaluate, val_metric)

    def end_epoch(self, val_metric: float | None = None) -> LayerHealthReport:
        """The active path's boundary; when a switch is due, then the switch, and the report is
        the joining path's as it stands (what the controllers decide on next)."""
        report = self.active.end_epoch(val_metric)
        self._stepped = False
        if self._pending and self._can_leave():
            self._switch()
            report = self.active._last_report = boundary.snapshot(self.active, val_metric)
        return report

    # ---------------------------------------------------------------- checkpoint
    def get_extra_state(self) -> torch.Tensor:
        state = {"path": self._path, "pending": self._pending, "stepped": self._stepped}
        return torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8)

    def set_extra_state(self, extra: torch.Tensor) -> None:
        state = json.loads(bytes(extra.cpu().numpy().tobytes()).decode())
        self._path, self._pending = state["path"], state["pending"]
        self._stepped = state["stepped"]


def _freeze_after_load(module: DualPathLayer, _keys: object) -> None:
    """After the paths' own load hooks (which restore their telemetry clocks); a function, not a
    lambda, so a whole model pickles."""
    module.frozen._tracking_step = False
