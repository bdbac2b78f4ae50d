"""Kasmina's records <-> the Oona wire contracts, and the application of lifecycle commands.

Pure functions (no bus, no threads): the runtime calls them at epoch boundaries."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from oona.contracts import (
    AckReason,
    CommandAck,
    FieldReport,
    Germinate,
    LayerHealthReport,
    LifecycleCommand,
    StageVisit,
    stage_from_wire,
    stage_to_wire,
)

from ..blueprints import BlueprintSpec, get_blueprint, resolve_wire_spec
from ..dual import PATHS, DualPathLayer
from ..events import SeedOutcome
from ..lifecycle import ACTIVE_STAGES, InvalidTransitionError, LifecycleError, SeedStage
from ..protocol import SeedLayer
from ..strategies import get_strategy
from ..telemetry import LayerHealthReport as Report

log = logging.getLogger(__name__)
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
        contribution=report.contribution.tolist(), ready_for=ready.tolist(),
        output_grad_sq=([] if np.isnan(report.output_grad_sq).all()
                        else report.output_grad_sq.tolist()))


def outcome_to_field_report(outcome: SeedOutcome, job_id: str, chunk_size: int,
                            higher_is_better: bool, metric_name: str,
                            metric_history: Sequence[float] = ()) -> FieldReport:
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
        chunk_size=chunk_size, end_reason=outcome.reason,
        execution_path=outcome.execution_path, metric_history=metric_history)


# A Germinate carrying a spec refused for one of these reasons gets a field report (the seed
# stayed DORMANT), so Karn counts the refusal against the spec: its search retires a proposal
# the runtimes keep refusing (karn/search.py). Other refusals (capacity, embargo, a paused job)
# say nothing about the blueprint.
BLUEPRINT_REFUSALS = frozenset({AckReason.ACK_REASON_UNKNOWN_BLUEPRINT,
                                AckReason.ACK_REASON_BLUEPRINT_DOES_NOT_FIT})


def refusal_to_field_report(command: LifecycleCommand, ack: CommandAck,
                            layer: SeedLayer | None, higher_is_better: bool,
                            metric_name: str) -> FieldReport | None:
    """The field report of a Germinate carrying a spec that was refused for a blueprint reason
    (BLUEPRINT_REFUSALS): final stage DORMANT (where the seed stayed), no history, no metrics,
    the ack's reason and message as its end reason; None for any other answer."""
    if (ack.success or ack.reason not in BLUEPRINT_REFUSALS or layer is None
            or command.WhichOneof("action") != "germinate"
            or command.germinate.WhichOneof("blueprint") != "blueprint_spec"):
        return None
    spec, nan = command.germinate.blueprint_spec, float("nan")
    return FieldReport(
        # One answer per command id (a resend is a duplicate, never refused again).
        report_id=f"{command.job_id}/{command.layer_id}/{command.seed_index}/refused:"
                  f"{command.command_id}",
        job_id=command.job_id, layer_id=command.layer_id, seed_index=command.seed_index,
        # No strategy: the refusal says nothing of one (Karn's per-strategy records skip it).
        blueprint_id=spec.blueprint_id, blueprint_name=spec.name, strategy_id=-1,
        final_stage=stage_to_wire(SeedStage.DORMANT), metric_name=metric_name,
        higher_is_better=higher_is_better, metric_before=nan, metric_after=nan,
        contribution=nan, chunk_size=layer.chunk_size(command.seed_index),
        end_reason=f"refused: {AckReason.Name(ack.reason)}: {ack.message}"[:1000],
        execution_path=layer.execution_path)


# A command may name a boundary at most this far ahead when the job's last epoch is unknown
# (library use): further is a bug or a hostile sender, and it would sit pending in the group.
MAX_LEAD_EPOCHS = 1_000
MAX_COMMAND_ID = 128  # the envelope's event id limit (oona.envelope), as publishers reuse it
MAX_RATIONALE = 4_096
_JOB_WIDE = ("pause_adaptation", "resume_adaptation", "emergency_stop")


class CommandTarget:
    """The seed layers of one job, and the job-wide adaptation switches."""

    def __init__(self, job_id: str, layers: list[SeedLayer]) -> None:
        self.job_id = job_id
        self.layers = {layer.layer_id: layer for layer in layers}
        self.paused = False
        self.stopped = False

    def check(self, command: LifecycleCommand, boundary: int,
              last_epoch: int | None = None) -> CommandAck | None:
        """The refusal of a command whose fields are invalid for this job whatever its seeds'
        state (checked on arrival, before it waits for its epoch); None when it is well formed.
        `boundary` is the epoch boundary coming next, `last_epoch` the job's last one."""
        ack = CommandAck(command_id=command.command_id, job_id=self.job_id,
                         applied_epoch=max(boundary - 1, 0))
        action = command.WhichOneof("action")
        if not 0 < len(command.command_id) <= MAX_COMMAND_ID:
            return _refuse(ack, AckReason.ACK_REASON_INVALID,
                           f"command_id must have 1..{MAX_COMMAND_ID} characters")
        if command.job_id != self.job_id:
            return _refuse(ack, AckReason.ACK_REASON_UNKNOWN_JOB, f"not job {self.job_id!r}")
        if action is None:
            return _refuse(ack, AckReason.ACK_REASON_INVALID, "command has no action")
        if len(command.rationale) > MAX_RATIONALE:
            return _refuse(ack, AckReason.ACK_REASON_INVALID,
                           f"rationale longer than {MAX_RATIONALE} characters")
        if command.HasField("apply_at_step"):
            return _refuse(ack, AckReason.ACK_REASON_INVALID,
                           "apply_at_step is not supported: commands apply at epoch "
                           "boundaries (use apply_at_epoch)")
        if command.HasField("apply_at_epoch"):
            latest = last_epoch if last_epoch is not None else boundary + MAX_LEAD_EPOCHS
            if command.apply_at_epoch > latest:
                return _refuse(ack, AckReason.ACK_REASON_INVALID,
                               f"due at epoch {command.apply_at_epoch}, after the last epoch "
                               f"this job can apply it at ({latest})")
        if action == "switch_path":
            return self._check_switch(ack, command)
        if action in _JOB_WIDE:
            return None
        layer = self.layers.get(command.layer_id)
        if layer is None:
            return _refuse(ack, AckReason.ACK_REASON_UNKNOWN_LAYER,
                           f"no seed layer {command.layer_id[:200]!r}")
        if not command.HasField("seed_index"):
            return _refuse(ack, AckReason.ACK_REASON_INVALID, f"{action} needs seed_index")
        if command.seed_index >= layer.num_seeds:
            return _refuse(ack, AckReason.ACK_REASON_UNKNOWN_SEED,
                           f"seed {command.seed_index} does not exist in {layer.layer_id!r} "
                           f"({layer.num_seeds} seeds)")
        try:
            if action == "advance":
                _target_stage(command)
            elif action == "germinate":
                _blueprint_and_strategy(command.germinate)
        except LifecycleError as err:
            return _refuse(ack, _REASONS.get(err.code, AckReason.ACK_REASON_INVALID), str(err))
        return None

    def apply(self, command: LifecycleCommand, epoch: int, step: int,
              last_epoch: int | None = None) -> CommandAck:
        """Check and apply one command; every outcome, success or refusal, is an ack (state
        unchanged on refusal). Never raises: an unexpected error is an INTERNAL_ERROR ack."""
        refusal = self.check(command, epoch + 1, last_epoch)
        if refusal is not None:
            refusal.applied_step = step
            return refusal
        ack = CommandAck(command_id=command.command_id, job_id=self.job_id, applied_epoch=epoch,
                         applied_step=step)
        action = command.WhichOneof("action")
        try:
            if action == "switch_path":
                for layer in self._switching(command):
                    layer.request_path(command.switch_path.path)
                ack.success, ack.reason = True, AckReason.ACK_REASON_OK
                return ack
            if action in _JOB_WIDE:
                return self._job_wide(ack, action)
            return self._seed_command(ack, command, action)
        except Exception as err:  # noqa: BLE001 - a bad command must never fail the job
            log.exception("job %s: command %s failed", self.job_id, command.command_id)
            return _refuse(ack, AckReason.ACK_REASON_INTERNAL_ERROR, repr(err)[:500])

    def _switching(self, command: LifecycleCommand) -> list[DualPathLayer]:
        """The layers a switch_path command names: its layer, or every DualPathLayer."""
        layers = ([self.layers[command.layer_id]] if command.layer_id
                  else list(self.layers.values()))
        return [layer for layer in layers if isinstance(layer, DualPathLayer)]

    def _check_switch(self, ack: CommandAck, command: LifecycleCommand) -> CommandAck | None:
        if command.switch_path.path not in PATHS:
            return _refuse(ack, AckReason.ACK_REASON_INVALID,
                           f"switch_path.path must be one of {PATHS}, got "
                           f"{command.switch_path.path[:40]!r}")
        if command.layer_id and command.layer_id not in self.layers:
            return _refuse(ack, AckReason.ACK_REASON_UNKNOWN_LAYER,
                           f"no seed layer {command.layer_id[:200]!r}")
        if not self._switching(command):
            return _refuse(ack, AckReason.ACK_REASON_INVALID,
                           "no layer it names has two execution paths (a DualPathLayer)")
        return None

    def _seed_command(self, ack: CommandAck, command: LifecycleCommand,
                      action: str) -> CommandAck:
        layer, seed = self.layers[command.layer_id], command.seed_index
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
                    try:
                        if layer.stage_of(seed) is SeedStage.GERMINATED:
                            layer.cancel_germination(seed)
                        else:
                            layer.transition(seed, SeedStage.ROLLED_BACK,
                                             reason="emergency stop")
                    except LifecycleError:  # the others still stop; the report shows this one
                        log.exception("job %s: emergency stop of %s seed %d refused",
                                      self.job_id, layer.layer_id, seed)
        ack.success, ack.reason = True, AckReason.ACK_REASON_OK
        return ack


def _target_stage(command: LifecycleCommand) -> SeedStage:
    value = command.advance.target_stage
    try:
        target = stage_from_wire(value)
    except ValueError:
        target = None
    if target is None:
        raise LifecycleError(f"advance needs a target_stage that is a SeedStage, got {value}")
    return SeedStage(target)


def _blueprint_and_strategy(g: Germinate) -> tuple[str | int | BlueprintSpec, str | int]:
    """The germination's blueprint and strategy keys, after checking both are known here; a
    spec is built from its fields (resolve_wire_spec), whether this process knew it or not."""
    which = g.WhichOneof("blueprint")
    blueprint = (resolve_wire_spec(g.blueprint_spec) if which == "blueprint_spec" else
                 {"blueprint_name": g.blueprint_name, "blueprint_id": g.blueprint_id,
                  None: "residual_mlp"}[which])
    strategy = {"strategy_name": g.strategy_name, "strategy_id": g.strategy_id,
                None: "fixed_ramp"}[g.WhichOneof("strategy")]
    get_blueprint(blueprint)  # raise UnknownBlueprintError / UnknownStrategyError
    get_strategy(strategy)
    return blueprint, strategy


def _act(layer: SeedLayer, seed: int, command: LifecycleCommand, action: str) -> None:
    reason = f"command {command.command_id}: {command.rationale}".rstrip(": ")
    if action == "germinate":
        layer.germinate(seed, *_blueprint_and_strategy(command.germinate))
    elif action == "advance":
        layer.transition(seed, _target_stage(command), force=command.advance.force,
                         reason=reason)
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
