"""gRPC `kasmina.tamiyo.v1.Tamiyo.Step`: a synchronous decision for a training job that asks at
its epoch boundary, by the same policy as the bus path.

Such a job applies the returned commands itself, at once, so they carry no apply epoch and are
not tracked for acks. Its view lives in this process's memory; asking again for an epoch
already decided (a client retry) returns the same signal. Requests are checked as bus messages
are (tamiyo.validation; `INVALID_ARGUMENT`); at most `max_jobs` jobs are kept
(`RESOURCE_EXHAUSTED` past it), and a job not heard of for the retention period is forgotten.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
import oona.service
import oona.signing
from oona.contracts import EpochEvent, EpochEventKind
from oona.proto.kasmina.tamiyo.v1 import tamiyo_service_pb2 as pb
from oona.proto.kasmina.tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc

from tamiyo.controller import Controller
from tamiyo.validation import (
    InvalidContent,
    JobLimits,
    check_epoch,
    check_id,
    check_layer_report,
)
from tamiyo.view import JobView

log = logging.getLogger(__name__)


class TamiyoServicer(pb_grpc.TamiyoServicer):
    def __init__(self, controller: Controller, limits: JobLimits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if controller.delivery.over_bus:
            raise ValueError("Step answers synchronously: give it a controller with "
                             "DeliveryConfig(over_bus=False)")
        self._controller = controller
        self._limits = limits or JobLimits()
        self._clock = clock
        self._views: dict[str, JobView] = {}
        self._signals: dict[str, tuple[int, pb.AdaptationSignal]] = {}
        self._lock = threading.Lock()

    def Step(self, request: pb.SystemState, context: grpc.ServicerContext) -> pb.AdaptationSignal:
        if not request.job_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id is required")
        try:
            check_id("job_id", request.job_id)
            check_epoch("epoch", request.epoch)
            if len(request.layers) > self._limits.max_layers_per_job:
                raise InvalidContent(f"{len(request.layers)} layers (at most "
                                     f"{self._limits.max_layers_per_job})")
            for report in request.layers:
                check_layer_report(report)
        except InvalidContent as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._lock:  # one decision at a time: views are shared across the thread pool
            now = self._clock()
            last = self._signals.get(request.job_id)
            if last is not None and last[0] == request.epoch:
                self._views[request.job_id].last_message_at = now
                return last[1]
            self._forget_silent_jobs(now)
            view = self._views.get(request.job_id)
            if view is None:
                if len(self._views) >= self._limits.max_jobs:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"already keeping {len(self._views)} jobs (TAMIYO_MAX_JOBS)")
                view = self._views[request.job_id] = JobView(request.job_id)
            view.last_message_at = now
            for report in request.layers:
                view.record_report(report)
            event = EpochEvent(job_id=request.job_id,
                               kind=EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED,
                               epoch=request.epoch, step=request.step,
                               val_metric=request.val_metric,
                               higher_is_better=request.higher_is_better)
            if not view.record_epoch_end(event, time.time()):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"epoch {request.epoch} is older than epoch {view.epoch}, "
                              "already decided for this job")
            commands = self._controller.decide(view, time.time())
            rationale = "; ".join(f"{c.WhichOneof('action')} {c.layer_id}[{c.seed_index}]: "
                                  f"{c.rationale}" for c in commands) or "no change"
            pause = getattr(self._controller.policy, "growth_pause", None)
            paused = pause(view) if pause is not None else None
            if paused is not None:  # the stability guard held germinations back
                rationale += f"; {paused.describe()}"
            signal = pb.AdaptationSignal(commands=commands, rationale=rationale)
            self._signals[request.job_id] = (request.epoch, signal)
            return signal

    def _forget_silent_jobs(self, now: float) -> None:
        for job_id in [j for j, v in self._views.items()
                       if now - v.last_message_at > self._limits.retention_s]:
            del self._views[job_id]
            self._signals.pop(job_id, None)


def start_grpc_server(servicer: TamiyoServicer, host: str, port: int, max_workers: int = 4,
                      token: str | None = None) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the port it bound (useful when `port` is 0).
    `token`: every call must carry it (UNAUTHENTICATED otherwise); None: no check."""
    add = oona.signing.with_token(pb_grpc.add_TamiyoServicer_to_server, token)
    return oona.service.start_grpc_server(add, servicer, host, port, name="tamiyo",
                                          max_workers=max_workers)
