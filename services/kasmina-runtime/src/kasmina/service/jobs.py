"""Training jobs of the runtime service: each runs a built-in recipe in its own thread (never
on the event loop or a gRPC worker), joined to the fleet with `FleetRuntime` when seeded, and
records updates that watchers stream. Unfinished jobs are kept in a registry file, so a runtime
that was killed is followed by one that reports its jobs failed or resumes them."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import oona
import torch
from oona import streams
from oona.contracts import EpochEvent, EpochEventKind
from oona.proto.kasmina.runtime.v1.runtime_service_pb2 import JobState, JobUpdate

from ..fleet import FleetRuntime, health_to_proto
from ..fleet.inbox import delete_command_streams
from ..lifecycle import BLENDING_STAGES, SeedStage
from ..recipes import DigitsParams, EpochRecord, build_model, load_digits_split, train_digits
from ..wrap import seed_layers
from . import metrics
from .limits import (
    JOB_ID_PATTERN,
    LimitReached,
    check_job_id,
    confined,
    parse_job_parameters,
)
from .registry import JobRegistry

log = logging.getLogger(__name__)
RECIPES = ("digits",)
_TERMINAL = (JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED,
             JobState.JOB_STATE_CANCELLED)


class Job:
    def __init__(self, job_id: str, params: DigitsParams, bus: oona.BusSettings | None,
                 checkpoint_dir: Path, registry: JobRegistry | None = None,
                 checkpoint_every: int = 0) -> None:
        self.job_id, self.params, self.bus = job_id, params, bus
        self.checkpoint_dir, self.registry = checkpoint_dir, registry
        self.checkpoint_every = checkpoint_every
        self.state = JobState.JOB_STATE_QUEUED
        self.updates: list[JobUpdate] = []
        self.changed = threading.Condition()
        self.cancel_reason: str | None = None
        self.checkpoints: list[tuple[Path, threading.Event, list]] = []
        self.written: set[Path] = set()  # this job's own checkpoints: it may overwrite them
        self.model: torch.nn.Module | None = None
        self.runtime: FleetRuntime | None = None
        self.layer_ids: list[str] = []
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

    def fail_without_running(self, message: str) -> None:
        """Record a job that cannot run (its runtime died): watchers see it failed."""
        self._push(JobUpdate(job_id=self.job_id, state=self.state, epoch_event=EpochEvent(
            job_id=self.job_id, kind=EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED,
            message=message)))
        self._set_state(JobState.JOB_STATE_FAILED)

    def _run(self) -> None:
        metrics.start_job(self.job_id)
        self._set_state(JobState.JOB_STATE_RUNNING)
        runtime = None
        try:
            data = load_digits_split()
            self.model = build_model(self.params)
            self.layer_ids = [layer.layer_id for layer in seed_layers(self.model)]
            resume = (torch.load(self.params.resume_from, weights_only=True)
                      if self.params.resume_from else None)
            if resume is not None:  # before the runtime attaches: it starts at this epoch
                self.model.load_state_dict(resume["model"])
            if self.params.seeded:
                runtime = FleetRuntime(self.model, self.job_id, self.bus, metric_name="val_loss",
                                       last_epoch=self.params.epochs)
                if resume is not None:
                    runtime.load_state_dict(resume.get("fleet", {}))
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
            if self.registry is not None:
                self.registry.finished(self.job_id)

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
            metrics.COMMANDS.labels(self.job_id, metrics.ack_reason(ack.reason)).inc()
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
        if self.checkpoint_every and record.epoch % self.checkpoint_every == 0:
            self._save(self.checkpoint_dir / f"{self.job_id}.auto.pt", snapshot())
        self._answer_checkpoints(snapshot)
        return self.cancel_reason is None

    def checkpoint_path(self, path: str) -> Path:
        """Where CheckpointJob may write: inside the checkpoint directory, and not over a file
        that is not one of this job's own checkpoints."""
        if not path:
            return self.checkpoint_dir / f"{self.job_id}-{uuid.uuid4().hex[:6]}.pt"
        target = confined(self.checkpoint_dir, path)
        if target.exists() and target not in self.written:
            raise PermissionError(f"{path[:200]!r} exists and is not a checkpoint of this job")
        return target

    def checkpoint(self, path: str, timeout: float) -> tuple[str, int]:
        """Ask for a checkpoint at the next epoch boundary (the model is only consistent
        there) and wait for it."""
        if self.finished:
            raise RuntimeError(f"job {self.job_id} is {JobState.Name(self.state)}")
        target = self.checkpoint_path(path)
        done, out = threading.Event(), []
        self.checkpoints.append((target, done, out))
        if not done.wait(timeout):
            raise TimeoutError("no epoch boundary within the timeout")
        if not out:
            raise RuntimeError(f"job {self.job_id} ended before the next epoch boundary")
        return str(target), out[0]

    def _answer_checkpoints(self, snapshot: Callable[[], dict] | None = None) -> None:
        """At an epoch boundary (snapshot given) write the requested checkpoints; at the end
        of the job release the waiters empty-handed."""
        while self.checkpoints:
            path, done, out = self.checkpoints.pop(0)
            if snapshot is not None:
                state = snapshot()
                self._save(path, state)
                out.append(state["epoch"])
            done.set()

    def _save(self, path: Path, state: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fleet = self.runtime.state_dict() if self.runtime is not None else {}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
        torch.save({**state, "job_id": self.job_id, "params": vars(self.params),
                    "fleet": fleet}, tmp)
        os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint whole
        self.written.add(path.resolve())
        if self.registry is not None:
            self.registry.checkpointed(self.job_id, path.resolve())


class JobManager:
    def __init__(self, bus: oona.BusSettings | None, checkpoint_dir: Path, max_jobs: int = 4,
                 max_finished_jobs: int = 100) -> None:
        self.bus, self.checkpoint_dir = bus, checkpoint_dir.resolve()
        self.max_jobs, self.max_finished_jobs = max_jobs, max_finished_jobs
        self.registry = JobRegistry(self.checkpoint_dir)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def submit(self, job_id: str, recipe: str, parameters: dict[str, str]) -> Job:
        """A new job, running. ValueError: a bad field (named); PermissionError: a path outside
        the checkpoint directory; KeyError: the id exists; LimitReached: too many jobs."""
        if recipe not in RECIPES:
            raise ValueError(f"recipe: unknown {recipe[:40]!r}; known: {list(RECIPES)}")
        job_id = check_job_id(job_id) if job_id else f"job-{uuid.uuid4().hex[:8]}"
        params, service = parse_job_parameters(parameters)
        if params.resume_from:
            resume = confined(self.checkpoint_dir, params.resume_from)
            if not resume.is_file():
                raise ValueError(f"resume_from: no checkpoint {params.resume_from[:200]!r}")
            params.resume_from = str(resume)
        with self.lock:
            if job_id in self.jobs:
                raise KeyError(f"job {job_id!r} exists")
            running = sum(not job.finished for job in self.jobs.values())
            if running >= self.max_jobs:
                raise LimitReached(f"{running} jobs queued or running; the limit is "
                                   f"{self.max_jobs} (KASMINA_MAX_JOBS)")
            self._evict_finished()
            job = self.jobs[job_id] = Job(job_id, params, self.bus, self.checkpoint_dir,
                                          self.registry, int(service["checkpoint_every"]))
        metrics.JOBS.labels(JobState.Name(job.state)).inc()
        self.registry.started(job_id, recipe, dict(parameters), params.resume_from)
        job.thread.start()
        return job

    def _evict_finished(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished]
        for job in finished[:max(len(finished) - self.max_finished_jobs, 0)]:
            del self.jobs[job.job_id]
            metrics.forget_job(job.job_id, job.layer_ids)

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise LookupError(f"no job {job_id[:200]!r}")
        return job

    def cancel_all(self, reason: str) -> None:
        for job in self.jobs.values():
            job.cancel_reason = job.cancel_reason or reason

    def recover(self) -> None:
        """At start: the jobs a previous runtime on this checkpoint directory left unfinished
        are resumed from their last checkpoint when they asked for it (resume_on_restart),
        otherwise published failed (JOB_FAILED on the bus) so the controller lets them go."""
        failed = []
        for job_id, entry in self.registry.unfinished().items():
            if JOB_ID_PATTERN.fullmatch(job_id) is None:
                log.error("job registry: dropping an entry with an invalid id %r", job_id[:40])
                self.registry.finished(job_id)
                continue
            parameters = dict(entry.get("parameters", {}))
            checkpoint = entry.get("checkpoint", "")
            wants = parameters.get("resume_on_restart", "").lower() in ("true", "1")
            if wants and checkpoint and Path(checkpoint).is_file():
                log.info("job %s: resuming from %s after a runtime restart", job_id, checkpoint)
                try:
                    self.submit(job_id, entry.get("recipe", "digits"),
                                {**parameters, "resume_from": checkpoint})
                    continue
                except (ValueError, PermissionError, KeyError, LimitReached) as err:
                    log.error("job %s: cannot resume (%s)", job_id, err)
            failed.append(job_id)
        if not failed:
            return
        message = "the runtime running this job stopped before it finished (killed or crashed)"
        outbox = oona.OutboxThread(self.bus or oona.BusSettings.from_env(),
                                   sender_id="kasmina-runtime").start()
        for job_id in failed:
            outbox.put(streams.EPOCH_EVENTS, EpochEvent(
                job_id=job_id, kind=EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED, message=message))
        unsent = outbox.close()
        for job_id in failed:
            log.warning("job %s: reported failed: %s", job_id, message)
            job = self.jobs[job_id] = Job(job_id, DigitsParams(), self.bus, self.checkpoint_dir)
            metrics.JOBS.labels(JobState.Name(job.state)).inc()
            job.fail_without_running(message)
            if not unsent:  # else kept, so the next start reports it
                self.registry.finished(job_id)
        if not unsent:  # the controller lets them go: nobody will answer their commands
            delete_command_streams(self.bus or oona.BusSettings.from_env(), failed)
