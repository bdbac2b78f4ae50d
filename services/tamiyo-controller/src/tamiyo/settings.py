"""Typed Tamiyo settings, read from the environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tamiyo.controller import DeliveryConfig
from tamiyo.heuristics import HealthWeights
from tamiyo.policy import PolicyConfig
from tamiyo.stability import StabilityConfig
from tamiyo.validation import JobLimits

_PARSERS = {"int": int, "float": float, "str": str}


@dataclass(frozen=True)
class TamiyoSettings:
    """Where Tamiyo listens, how it decides and how it delivers commands.

    The bus settings are oona's own (`oona.BusSettings.from_env`: OONA_REDIS_URL and friends).
    Every field is read from TAMIYO_<FIELD NAME IN CAPITALS>.
    """

    grpc_port: int = 50052
    http_port: int = 8082
    # Both servers listen here; 0.0.0.0 in a container.
    bind_host: str = "127.0.0.1"
    # This replica's stable name: its consumer groups are `tamiyo.<consumer_name>` (one per
    # replica, so every replica sees every message), so each replica needs its own, kept
    # across its restarts. The host name by default: unique per container when compose scales
    # the service, the same after a restart; two replicas on one host need a name each.
    consumer_name: str = field(default_factory=socket.gethostname)
    # Owner id in the job leases; unique per process, so a restarted replica is a new owner.
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # A job whose owner stops renewing is taken over by another replica after this long.
    lease_ms: int = 5000
    karn_address: str = "127.0.0.1:50053"
    # Short: a germination falls back to default_blueprint rather than hold up the decision.
    karn_timeout_s: float = 1.0
    default_blueprint: str = "residual_mlp"
    default_strategy: str = "fixed_ramp"
    # Comma-separated catalog names germinations may use (Karn's best among them); empty: any.
    blueprints: str = ""
    # 1: per job, the kasmina.grafting_strategy and kasmina.blueprint_allow_list feature flags
    # (oona.flags, in the bus's Redis) override default_strategy and blueprints, once an
    # operator has set them (README "Feature flags"). 0: flags are not read.
    flags: int = 0

    plateau_epochs: int = 2
    min_delta: float = 0.01
    max_active_seeds: int = 4
    cooldown_epochs: int = 3
    variance_weight: float = 1.0
    dead_ratio_weight: float = 1.0
    correlation_weight: float = 1.0
    fallback_chunk_size: int = 16
    # Where to germinate: "health" or "gradient" (PolicyConfig.placement; the jobs' layers then
    # need KasminaConfig(track_output_gradient=True), else health order stands).
    placement: str = "health"
    # The stability guard (tamiyo.stability, README "Stability guard"): 0 turns it off.
    stability_guard: int = 1
    spike_mads: float = StabilityConfig.spike_mads
    spike_baseline_epochs: int = StabilityConfig.baseline_epochs
    spike_min_baseline_epochs: int = StabilityConfig.min_baseline_epochs
    spike_min_spread: float = StabilityConfig.min_spread
    rollback_limit: int = StabilityConfig.rollback_limit
    rollback_window: int = StabilityConfig.rollback_window
    drift_limit: float = StabilityConfig.drift_limit
    resume_epochs: int = StabilityConfig.resume_epochs

    ack_timeout_s: float = 10.0
    max_command_attempts: int = 5
    # After an epoch ends, wait at most this long for layers that have not reported it yet.
    report_grace_s: float = 2.0
    # How often overdue acks and report grace periods are checked.
    tick_s: float = 0.5
    max_deliveries: int = 10
    # Bounded drain at SIGTERM: the batch in hand and in-flight RPCs get this long.
    shutdown_grace_s: float = 10.0
    # A job with no message for this long is let go, and a job's saved state expires this long
    # after its last change (so a finished job's too). A day: far longer than an epoch. Must
    # exceed the longest epoch plus any pause of a job, or its decision state is let go.
    job_retention_s: float = JobLimits.retention_s
    # The same for a job of which no epoch event has come (reports only: not a started job).
    unstarted_job_retention_s: float = JobLimits.unstarted_retention_s
    # Jobs followed at once, and layers per job; a message past either is dead-lettered.
    max_jobs: int = JobLimits.max_jobs
    max_layers_per_job: int = JobLimits.max_layers_per_job

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        for name in ("karn_timeout_s", "report_grace_s", "tick_s", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be >= 1")
        if not self.replica_id:
            raise ValueError("replica_id must not be empty")
        # Renewed every lease_ms / 3: a lease shorter than a tick would lapse between ticks.
        if self.lease_ms < 3 * self.tick_s * 1000:
            raise ValueError("lease_ms must be at least 3 * tick_s")
        # Fail at start, not at the first decision.
        self.policy()
        self.delivery()
        self.limits()

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            plateau_epochs=self.plateau_epochs, min_delta=self.min_delta,
            max_active_seeds=self.max_active_seeds, cooldown_epochs=self.cooldown_epochs,
            weights=HealthWeights(self.variance_weight, self.dead_ratio_weight,
                                  self.correlation_weight),
            fallback_chunk_size=self.fallback_chunk_size, placement=self.placement,
            stability=StabilityConfig(
                spike_mads=self.spike_mads, baseline_epochs=self.spike_baseline_epochs,
                min_baseline_epochs=self.spike_min_baseline_epochs,
                min_spread=self.spike_min_spread, rollback_limit=self.rollback_limit,
                rollback_window=self.rollback_window, drift_limit=self.drift_limit,
                resume_epochs=self.resume_epochs) if self.stability_guard else None)

    def limits(self) -> JobLimits:
        return JobLimits(retention_s=self.job_retention_s,
                         unstarted_retention_s=self.unstarted_job_retention_s,
                         max_jobs=self.max_jobs, max_layers_per_job=self.max_layers_per_job)

    def delivery(self) -> DeliveryConfig:
        return DeliveryConfig(over_bus=True, ack_timeout_s=self.ack_timeout_s,
                              max_attempts=self.max_command_attempts)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TamiyoSettings:
        """Settings from `TAMIYO_*` variables; unset or empty ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in fields(cls):
            variable = f"TAMIYO_{setting.name.upper()}"
            raw = env.get(variable)
            if not raw:
                continue
            try:
                values[setting.name] = _PARSERS[str(setting.type)](raw)
            except ValueError as exc:
                raise ValueError(f"{variable}={raw!r}: {exc}") from exc
        return cls(**values)
