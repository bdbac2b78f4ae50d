"""Kasmina's records <-> the Oona wire contracts, and the application of lifecycle commands.

Pure functions (no bus, no threads): the runtime calls them at epoch boundaries."""

from __future__ import annotations

import numpy as np
from oona.contracts import (
    AckReason,
    CommandAck,
    FieldReport,
    LayerHealthReport,
    LifecycleCommand,
    StageVisit,
    stage_from_wire,
    stage_to_wire,
)

from ..blueprints import get_blueprint
from ..events import SeedOutcome
from ..lifecycle import ACTIVE_STAGES, InvalidTransitionError, LifecycleError, SeedStage
from ..protocol import SeedLayer
from ..strategies import get_strategy
from ..telemetry import LayerHealthReport as Report

_REASONS = {
    "unknown_seed": AckReason.ACK_REASON_UNKNOWN_SEED,
    "refused_transition": AckReason.ACK_REASON_REFUSED_TRANSITION,
    "gate_not_passed": AckReason.ACK_REASON_GATE_NOT_PASSED,
    "embargo": AckReason.ACK_REASON_EMBARGO,
    "capacity": AckReason.ACK_REASON_CAPACITY,
    "blueprint_does_not_fit": AckReason.ACK_REASON_BLUEPRINT_DOES_NOT_FIT,
    "unknown_blueprint": AckReason.ACK_REASON_UNKNOWN_BLUEPRINT,
    "unknown_strategy": AckReason.ACK_REASON_UNKNOWN_STRATEGY,
    "invalid": AckReason.ACK_REASON_INVALID,
}
_WIRE_STAGE = np.array([stage_to_wire(s) for s in SeedStage], dtype=np.int32)


def health_to_proto(report: Report, job_id: str) -> LayerHealthReport:
    ready = np.where(report.ready_for >= 0, _WIRE_STAGE[np.maximum(report.ready_for, 0)], 0)
    return LayerHealthReport(
        job_id=job_id, layer_id=report.layer_id, epoch=report.epoch, step=report.step,
        num_seeds=report.num_seeds, features=report.chunks[-1][1],
        stage=_WIRE_STAGE[report.stage].tolist(),
        blueprint_id=report.blueprint_id.tolist(), epochs_in_stage=report.epochs_in_stage.tolist(),
        strategy_id=report.strategy_id.tolist(), alpha=report.alpha.tolist(),
        chunk_variance=report.chunk_variance.tolist(), dead_ratio=report.dead_ratio.tolist(),
        mean_abs_correlation=report.mean_abs_correlation.tolist(),
        reconstruction_ratio=report.reconstruction_ratio.tolist(),
        grad_norm=report.grad_norm.tolist(), drift=report.drift.tolist(),
        contribution=report.contribution.tolist(), ready_for=ready.tolist())


def outcome_to_field_report(outcome: SeedOutcome, job_id: str, chunk_size: int,
                            higher_is_better: bool, metric_name: str) -> FieldReport:
    def finite(value: float | None) -> float:
        return float("nan") if value is None else float(value)

    return FieldReport(
        # One seed ends once per germination: (job, layer, seed, germination epoch) is unique.
        report_id=f"{job_id}/{outcome.layer_id}/{outcome.seed_id}/{outcome.germinated_epoch}",
        job_id=job_id, layer_id=outcome.layer_id, seed_index=outcome.seed_id,
        blueprint_id=outcome.blueprint_id, blueprint_name=get_blueprint(outcome.blueprint_id).name,
        strategy_id=outcome.strategy_id, strategy_name=get_strategy(outcome.strategy_id).name,
        final_stage=stage_to_wire(outcome.outcome),
        history=[StageVisit(stage=stage_to_wire(s), entered_epoch=e,
                            epochs=(nxt[1] if nxt else outcome.ended_epoch) - e)
                 for (s, e), nxt in zip(outcome.history, [*outcome.history[1:], None],
                                        strict=True)],
        metric_name=metric_name, higher_is_better=higher_is_better,
        metric_before=finite(outcome.metric_before), metric_after=finite(outcome.metric_after),
        contribution=finite(outcome.contribution), parameters_added=outcome.params_added,
        chunk_size=chunk_size, end_reason=outcome.reason)


class CommandTarget:
    """The seed layers of one job, and the job-wide adaptation switches."""

    def __init__(self, job_id: str, layers: list[SeedLayer]) -> None:
        self.job_id = job_id
        self.layers = {layer.layer_id: layer for layer in layers}
        self.paused = False
        self.stopped = False

    def apply(self, command: LifecycleCommand, epoch: int, step: int) -> CommandAck:
        """Apply one command; every outcome, success or refusal, is an ack (state unchanged
        on refusal)."""
        ack = CommandAck(command_id=command.command_id, job_id=self.job_id, applied_epoch=epoch,
                         applied_step=step)
        action = command.WhichOneof("action")
        if command.job_id != self.job_id:
            return _refuse(ack, AckReason.ACK_REASON_UNKNOWN_JOB, f"not job {self.job_id!r}")
        if action is None:
            return _refuse(ack, AckReason.ACK_REASON_INVALID, "command has no action")
        if action in ("pause_adaptation", "resume_adaptation", "emergency_stop"):
            return self._job_wide(ack, action)
        layer = self.layers.get(command.layer_id)
        if layer is None:
            return _refuse(ack, AckReason.ACK_REASON_UNKNOWN_LAYER,
                           f"no seed layer {command.layer_id!r}")
        if not command.HasField("seed_index"):
            return _refuse(ack, AckReason.ACK_REASON_INVALID, f"{action} needs seed_index")
        seed = command.seed_index
        if seed >= layer.num_seeds:
            return _refuse(ack, AckReason.ACK_REASON_UNKNOWN_SEED,
                           f"seed {seed} does not exist in {layer.layer_id!r}")
        if self.stopped and action in ("germinate", "advance", "reset"):
            return _refuse(ack, AckReason.ACK_REASON_EMERGENCY_STOPPED, "emergency stop")
        if self.paused and action in ("germinate", "advance"):
            return _refuse(ack, AckReason.ACK_REASON_ADAPTATION_PAUSED, "adaptation paused")
        before = layer.stage_of(seed)
        ack.stage_before = stage_to_wire(before)
        try:
            _act(layer, seed, command, action)
        except LifecycleError as err:
            _refuse(ack, _REASONS.get(err.code, AckReason.ACK_REASON_INVALID), str(err))
        else:
            ack.success, ack.reason = True, AckReason.ACK_REASON_OK
        ack.stage_after = stage_to_wire(layer.stage_of(seed))
        return ack

    def _job_wide(self, ack: CommandAck, action: str) -> CommandAck:
        if action == "pause_adaptation":
            self.paused = True
        elif action == "resume_adaptation":
            self.paused = self.stopped = False
        else:  # emergency stop: every active seed back to the host, adaptation off
            self.paused = self.stopped = True
            for layer in self.layers.values():
                for seed in layer.seeds_in(*ACTIVE_STAGES):
                    if layer.stage_of(seed) is SeedStage.GERMINATED:
                        layer.cancel_germination(seed)
                    else:
                        layer.transition(seed, SeedStage.ROLLED_BACK, reason="emergency stop")
        ack.success, ack.reason = True, AckReason.ACK_REASON_OK
        return ack


def _act(layer: SeedLayer, seed: int, command: LifecycleCommand, action: str) -> None:
    reason = f"command {command.command_id}: {command.rationale}".rstrip(": ")
    if action == "germinate":
        g = command.germinate
        blueprint = {"blueprint_name": g.blueprint_name, "blueprint_id": g.blueprint_id,
                     # a spec must be in this process's catalog: it is named by its id
                     "blueprint_spec": g.blueprint_spec.blueprint_id,
                     None: "residual_mlp"}[g.WhichOneof("blueprint")]
        strategy = {"strategy_name": g.strategy_name, "strategy_id": g.strategy_id,
                    None: "fixed_ramp"}[g.WhichOneof("strategy")]
        layer.germinate(seed, blueprint, strategy)
    elif action == "advance":
        target = stage_from_wire(command.advance.target_stage)
        if target is None:
            raise LifecycleError("advance needs a target_stage")
        layer.transition(seed, SeedStage(target), force=command.advance.force, reason=reason)
    elif action == "cull":
        layer.transition(seed, SeedStage.CULLED, reason=reason)
    elif action == "rollback":
        layer.transition(seed, SeedStage.ROLLED_BACK, reason=reason)
    elif action == "cancel":
        if not layer.cancel_germination(seed):
            raise InvalidTransitionError(seed, layer.stage_of(seed), SeedStage.CANCELLED)
    elif action == "reset":
        layer.transition(seed, SeedStage.DORMANT, force=command.reset.force, reason=reason)


def _refuse(ack: CommandAck, reason: int, message: str) -> CommandAck:
    ack.success, ack.reason, ack.message = False, reason, message
    return ack
