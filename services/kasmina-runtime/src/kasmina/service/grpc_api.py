"""The KasminaRuntime gRPC service (proto/kasmina/runtime/v1/runtime_service.proto)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import oona.service
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc

from ..fleet import health_to_proto
from ..wrap import seed_layers
from .jobs import Job, JobManager

CHECKPOINT_TIMEOUT_S = 120.0


class RuntimeServicer(pb_grpc.KasminaRuntimeServicer):
    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs

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
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(err))
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return pb.SubmitJobResponse(job_id=job.job_id, state=job.state)

    def WatchJob(self, request, context) -> Iterator[pb.JobUpdate]:  # noqa: ANN001, N802
        job = self._job(request.job_id, context)
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
            context.abort(grpc.StatusCode.NOT_FOUND, f"no seed layer {request.layer_id!r}")
        reports = [layer.health_report() for layer in layers]
        return pb.ListSeedsResponse(layers=[health_to_proto(r, job.job_id)
                                            for r in reports if r is not None])

    def CheckpointJob(self, request, context):  # noqa: ANN001, ANN201, N802
        job = self._job(request.job_id, context)
        try:
            path, epoch = job.checkpoint(request.path, CHECKPOINT_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return pb.CheckpointJobResponse(path=path, epoch=epoch)

    def CancelJob(self, request, context):  # noqa: ANN001, ANN201, N802
        job = self._job(request.job_id, context)
        job.cancel_reason = job.cancel_reason or request.reason or "cancelled"
        return pb.CancelJobResponse(state=job.state)


def start_grpc_server(jobs: JobManager, host: str, port: int) -> tuple[grpc.Server, int]:
    # 16 workers: every WatchJob stream holds one for the job's whole run.
    return oona.service.start_grpc_server(pb_grpc.add_KasminaRuntimeServicer_to_server,
                                          RuntimeServicer(jobs), host, port, name="kasmina",
                                          max_workers=16)
