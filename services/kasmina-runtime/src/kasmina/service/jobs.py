"""Training jobs of the runtime service: each runs a built-in recipe in its own thread (never
on the event loop or a gRPC worker), joined to the fleet with `FleetRuntime` when seeded, and
records updates that watchers stream."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import oona
import torch
from oona.contracts import EpochEvent, EpochEventKind
from oona.proto.kasmina.runtime.v1.runtime_service_pb2 import JobState, JobUpdate

from ..fleet import FleetRuntime, health_to_proto
from ..lifecycle import BLENDING_STAGES, SeedStage
from ..recipes import DigitsParams, EpochRecord, build_model, load_digits_split, train_digits
from ..wrap import seed_layers
from . import metrics

log = logging.getLogger(__name__)
RECIPES = ("digits",)
_TERMINAL = (JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED,
             JobState.JOB_STATE_CANCELLED)


class Job:
    def __init__(self, job_id: str, params: DigitsParams, bus: oona.BusSettings | None,
                 checkpoint_dir: Path) -> None:
        self.job_id, self.params, self.bus = job_id, params, bus
        self.checkpoint_dir = checkpoint_dir
        self.state = JobState.JOB_STATE_QUEUED
        self.updates: list[JobUpdate] = []
        self.changed = threading.Condition()
        self.cancel_reason: str | None = None
        self.checkpoints: list[tuple[str, threading.Event, list]] = []
        self.model: torch.nn.Module | None = None
        self.runtime: FleetRuntime | None = None
        self.thread = threading.Thread(target=self._run, name=f"job-{job_id}", daemon=True)

    @property
    def finished(self) -> bool:
        return self.state in _TERMINAL

    def _set_state(self, state: int) -> None:
        metrics.JOBS.labels(JobState.Name(self.state)).dec()
        self.state = state
        metrics.JOBS.labels(JobState.Name(state)).inc()
        self._push(JobUpdate(job_id=self.job_id, state=state))

    def _push(self, update: JobUpdate) -> None:
        with self.changed:
            self.updates.append(update)
            self.changed.notify_all()

    def _run(self) -> None:
        self._set_state(JobState.JOB_STATE_RUNNING)
        runtime = None
        try:
            data = load_digits_split()
            self.model = build_model(self.params)
            resume = (torch.load(self.params.resume_from, weights_only=True)
                      if self.params.resume_from else None)
            if resume is not None:  # before the runtime attaches: it starts at this epoch
                self.model.load_state_dict(resume["model"])
            if self.params.seeded:
                runtime = FleetRuntime(self.model, self.job_id, self.bus, metric_name="val_loss")
                self.runtime = runtime
            result = train_digits(self.params, self.model, runtime, data, self._on_epoch, resume)
            summary = {"test_accuracy": result.test_accuracy, "params_host": result.params_host,
                       "params_added": result.params_added,
                       "final_stages": result.final_stages,
                       "epochs": [vars(e) for e in result.epochs]}
            self._push(JobUpdate(job_id=self.job_id, state=self.state, epoch_event=EpochEvent(
                job_id=self.job_id, kind=EpochEventKind.EPOCH_EVENT_KIND_JOB_FINISHED,
                epoch=len(result.epochs), message=json.dumps(summary))))
            self._set_state(JobState.JOB_STATE_CANCELLED if self.cancel_reason
                            else JobState.JOB_STATE_SUCCEEDED)
        except Exception as exc:  # noqa: BLE001 - a failed job is reported, not re-raised
            log.exception("job %s failed", self.job_id)
            self._push(JobUpdate(job_id=self.job_id, state=self.state, epoch_event=EpochEvent(
                job_id=self.job_id, kind=EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED,
                message=repr(exc))))
            self._set_state(JobState.JOB_STATE_FAILED)
        finally:
            if runtime is not None:
                runtime.close(failed=None if self.state != JobState.JOB_STATE_FAILED
                              else "job failed")
            self._answer_checkpoints()

    def _on_epoch(self, record: EpochRecord, acks: object, snapshot: Callable[[], dict]) -> bool:
        now = time.monotonic()
        started = getattr(self, "_epoch_started", now)
        self._epoch_started = now
        metrics.EPOCH_SECONDS.labels(self.job_id).observe(now - started)
        metrics.STEP_SECONDS.labels(self.job_id).set((now - started) / record.steps)
        metrics.VAL_METRIC.labels(self.job_id).set(record.val_loss)
        metrics.TRAIN_LOSS.labels(self.job_id).set(record.train_loss)
        if self.runtime is not None:
            for lag in self.runtime.take_command_lags():
                metrics.COMMAND_LAG.labels(self.job_id).observe(lag)
        for ack in acks or ():
            metrics.COMMANDS.labels(self.job_id, str(ack.reason)).inc()
            self._push(JobUpdate(job_id=self.job_id, state=self.state, ack=ack))
        for layer in seed_layers(self.model):
            report = layer.health_report()
            if report is None:
                continue
            stages = np.bincount(report.stage, minlength=len(SeedStage))
            for stage in SeedStage:
                metrics.SEEDS.labels(self.job_id, layer.layer_id, stage.name).set(stages[stage])
            blending = np.isin(report.stage, list(BLENDING_STAGES))
            metrics.ALPHA_MEAN.labels(self.job_id, layer.layer_id).set(
                float(report.alpha[blending].mean()) if blending.any() else 0.0)
            self._push(JobUpdate(job_id=self.job_id, state=self.state,
                                 health=health_to_proto(report, self.job_id)))
        self._push(JobUpdate(job_id=self.job_id, state=self.state, epoch_event=EpochEvent(
            job_id=self.job_id, kind=EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED,
            epoch=record.epoch, train_loss=record.train_loss, val_metric=record.val_loss,
            val_metric_name="val_loss", higher_is_better=False)))
        self._answer_checkpoints(snapshot)
        return self.cancel_reason is None

    def checkpoint(self, path: str, timeout: float) -> tuple[str, int]:
        """Ask for a checkpoint at the next epoch boundary (the model is only consistent
        there) and wait for it."""
        if self.finished:
            raise RuntimeError(f"job {self.job_id} is {JobState.Name(self.state)}")
        done, out = threading.Event(), []
        target = path or str(self.checkpoint_dir / f"{self.job_id}-{uuid.uuid4().hex[:6]}.pt")
        self.checkpoints.append((target, done, out))
        if not done.wait(timeout):
            raise TimeoutError("no epoch boundary within the timeout")
        if not out:
            raise RuntimeError(f"job {self.job_id} ended before the next epoch boundary")
        return target, out[0]

    def _answer_checkpoints(self, snapshot: Callable[[], dict] | None = None) -> None:
        """At an epoch boundary (snapshot given) write the requested checkpoints; at the end
        of the job release the waiters empty-handed."""
        while self.checkpoints:
            path, done, out = self.checkpoints.pop(0)
            if snapshot is not None:
                state = snapshot()
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                torch.save({**state, "job_id": self.job_id, "params": vars(self.params)}, path)
                out.append(state["epoch"])
            done.set()


class JobManager:
    def __init__(self, bus: oona.BusSettings | None, checkpoint_dir: Path) -> None:
        self.bus, self.checkpoint_dir = bus, checkpoint_dir
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def submit(self, job_id: str, recipe: str, parameters: dict[str, str]) -> Job:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; known: {list(RECIPES)}")
        params = DigitsParams.from_strings(parameters)
        job_id = job_id or f"job-{uuid.uuid4().hex[:8]}"
        with self.lock:
            if job_id in self.jobs:
                raise KeyError(f"job {job_id!r} exists")
            job = self.jobs[job_id] = Job(job_id, params, self.bus, self.checkpoint_dir)
        metrics.JOBS.labels(JobState.Name(job.state)).inc()
        job.thread.start()
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise LookupError(f"no job {job_id!r}")
        return job

    def cancel_all(self, reason: str) -> None:
        for job in self.jobs.values():
            job.cancel_reason = job.cancel_reason or reason
