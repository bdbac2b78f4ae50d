"""The KasminaRuntime gRPC service (proto/kasmina/runtime/v1/runtime_service.proto)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import oona.service
import oona.signing
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc

from ..fleet import health_to_proto
from ..wrap import seed_layers
from .jobs import Job, JobManager
from .limits import LimitReached

CHECKPOINT_TIMEOUT_S = 120.0


class RuntimeServicer(pb_grpc.KasminaRuntimeServicer):
    def __init__(self, jobs: JobManager, max_watchers: int) -> None:
        self.jobs = jobs
        self.max_watchers = max_watchers
        self._watchers = threading.BoundedSemaphore(max_watchers)

    def _job(self, job_id: str, context: grpc.ServicerContext) -> Job:
        try:
            return self.jobs.get(job_id)
        except LookupError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
            raise  # unreachable: abort raises

    def SubmitJob(self, request, context):  # noqa: ANN001, ANN201, N802
        try:
            job = self.jobs.submit(request.job_id, request.recipe or "digits",
                                   dict(request.parameters))
        except KeyError as err:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, err.args[0])
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except PermissionError as err:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        except LimitReached as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        return pb.SubmitJobResponse(job_id=job.job_id, state=job.state)

    def WatchJob(self, request, context) -> Iterator[pb.JobUpdate]:  # noqa: ANN001, N802
        job = self._job(request.job_id, context)
        if not self._watchers.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_watchers} WatchJob streams are open (KASMINA_MAX_WATCHERS)")
        try:
            yield from self._stream(job, context)
        finally:
            self._watchers.release()

    @staticmethod
    def _stream(job: Job, context: grpc.ServicerContext) -> Iterator[pb.JobUpdate]:
        sent = 0
        while context.is_active():
            with job.changed:
                while sent == len(job.updates) and not job.finished:
                    job.changed.wait(timeout=1.0)
                    if not context.is_active():
                        return
                pending = job.updates[sent:]
            yield from pending
            sent += len(pending)
            if job.finished and sent == len(job.updates):
                return

    def ListSeeds(self, request, context):  # noqa: ANN001, ANN201, N802
        job = self._job(request.job_id, context)
        layers = [layer for layer in (seed_layers(job.model) if job.model else [])
                  if not request.layer_id or layer.layer_id == request.layer_id]
        if request.layer_id and not layers:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no seed layer {request.layer_id[:200]!r}")
        reports = [layer.health_report() for layer in layers]
        return pb.ListSeedsResponse(layers=[health_to_proto(r, job.job_id)
                                            for r in reports if r is not None])

    def CheckpointJob(self, request, context):  # noqa: ANN001, ANN201, N802
        job = self._job(request.job_id, context)
        try:
            path, epoch = job.checkpoint(request.path, CHECKPOINT_TIMEOUT_S)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except PermissionError as err:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        except (RuntimeError, TimeoutError) as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return pb.CheckpointJobResponse(path=path, epoch=epoch)

    def CancelJob(self, request, context):  # noqa: ANN001, ANN201, N802
        job = self._job(request.job_id, context)
        job.cancel_reason = job.cancel_reason or request.reason[:500] or "cancelled"
        return pb.CancelJobResponse(state=job.state)


def start_grpc_server(jobs: JobManager, host: str, port: int, workers: int = 16,
                      max_watchers: int = 12, token: str | None = None
                      ) -> tuple[grpc.Server, int]:
    """`token`: every call must carry it (UNAUTHENTICATED otherwise); None: no check."""
    # Every WatchJob stream holds a worker for the job's whole run: watchers are capped below
    # the worker count, so unary calls always find one free.
    assert max_watchers < workers, "watchers must leave workers for unary calls"
    add = oona.signing.with_token(pb_grpc.add_KasminaRuntimeServicer_to_server, token)
    return oona.service.start_grpc_server(add, RuntimeServicer(jobs, max_watchers), host, port,
                                          name="kasmina", max_workers=workers)
