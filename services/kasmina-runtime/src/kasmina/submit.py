"""`python -m kasmina submit`: submit a digits training job to a running Kasmina runtime
(`python -m kasmina serve`) over gRPC and follow it to the end: one line per epoch, exit
status 0 when the job succeeded. In the containers: `docker compose exec kasmina python -m
kasmina submit`. The runtime's token comes from KASMINA_API_TOKEN or KASMINA_API_TOKEN_FILE
(every call sends it; without one the runtime answers UNAUTHENTICATED unless it runs with
OONA_INSECURE=1)."""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from oona.contracts import EpochEventKind
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from oona.settings import read_secret
from oona.signing import authenticated_channel

EPOCH_ENDED = EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kasmina submit", description=__doc__)
    p.add_argument("--address", default="127.0.0.1:50051", help="runtime gRPC host:port")
    p.add_argument("--job-id", default=f"digits-{int(time.time())}")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="more recipe parameters (hidden, bottleneck, seeds_per_layer, seed, "
                        "seeded, lr, weight_decay, track_output_gradient, resume_from, ...)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    args = p.parse_args(argv)
    malformed = [kv for kv in args.param if "=" not in kv or not kv.split("=", 1)[0]]
    if malformed:
        p.error(f"--param takes NAME=VALUE, got {malformed[0]!r}")
    parameters = {"epochs": str(args.epochs), **dict(kv.split("=", 1) for kv in args.param)}
    try:
        token = read_secret("KASMINA_API_TOKEN")
    except ValueError as err:
        p.error(str(err))
    try:
        return _submit_and_follow(args, parameters, token)
    except grpc.RpcError as err:  # the runtime's refusal names the field: say it, no traceback
        print(f"{args.job_id}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2 if err.code() == grpc.StatusCode.INVALID_ARGUMENT else 1


def _submit_and_follow(args: argparse.Namespace, parameters: dict[str, str],
                       token: str | None) -> int:
    with authenticated_channel(args.address, token) as channel:
        stub = pb_grpc.KasminaRuntimeStub(channel)
        reply = stub.SubmitJob(pb.SubmitJobRequest(job_id=args.job_id, recipe="digits",
                                                   parameters=parameters), timeout=30)
        print(f"submitted {reply.job_id}: {pb.JobState.Name(reply.state)}", flush=True)
        if args.no_wait:
            return 0
        state = reply.state
        for update in stub.WatchJob(pb.WatchJobRequest(job_id=reply.job_id)):
            state = update.state
            event = update.epoch_event
            if update.HasField("epoch_event") and event.kind == EPOCH_ENDED:
                print(f"epoch {event.epoch}: train_loss {event.train_loss:.4f} "
                      f"{event.val_metric_name} {event.val_metric:.4f}", flush=True)
        print(f"{reply.job_id}: {pb.JobState.Name(state)}")
        return 0 if state == pb.JobState.JOB_STATE_SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
