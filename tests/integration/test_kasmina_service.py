"""The Kasmina runtime as a real process (`python -m kasmina serve`) on an embedded Redis: a
job submitted over gRPC trains, applies a lifecycle command from the bus with an ack, streams
its progress, answers ListSeeds and CheckpointJob, resumes from a checkpoint, and can be
cancelled; SIGTERM ends it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import grpc
import pytest
import torch
from kasmina import SeedStage
from oona import BusSettings, EmbeddedRedis, open_bus, streams
from oona.contracts import Germinate, LifecycleCommand, stage_from_wire
from oona.embedded import free_port
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


async def _publish(url: str, command: LifecycleCommand) -> None:
    async with open_bus(BusSettings.from_dsn(url)) as bus:
        await bus.publisher("test").publish(streams.commands(command.job_id), command,
                                            event_id=command.command_id)


def test_runtime_service_runs_a_job_from_the_bus(oona_restartable_broker: EmbeddedRedis,
                                                 tmp_path):
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, OONA_REDIS_URL=oona_restartable_broker.url,
               KASMINA_GRPC_PORT=str(grpc_port), KASMINA_HTTP_PORT=str(http_port),
               KASMINA_CHECKPOINT_DIR=str(tmp_path / "ckpt"))
    log = (tmp_path / "kasmina.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "kasmina", "serve"], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, (tmp_path / "kasmina.log").read_text()
                assert time.monotonic() < deadline, "not ready within 60 s"
                time.sleep(0.2)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = pb_grpc.KasminaRuntimeStub(channel)
        job = f"job-{uuid.uuid4().hex[:6]}"
        command = LifecycleCommand(command_id=str(uuid.uuid4()), job_id=job, layer_id="0",
                                   seed_index=2,
                                   germinate=Germinate(blueprint_name="residual_mlp"))
        asyncio.run(_publish(oona_restartable_broker.url, command))  # before the job exists
        with pytest.raises(grpc.RpcError) as bad:
            stub.SubmitJob(pb.SubmitJobRequest(recipe="digits", parameters={"epochs": "x"}))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.SubmitJob(pb.SubmitJobRequest(job_id=job, recipe="digits",
                                           parameters={"epochs": "4", "seeds_per_layer": "4"}))
        checkpoint = stub.CheckpointJob(pb.CheckpointJobRequest(job_id=job))
        assert checkpoint.epoch >= 1
        assert "model" in torch.load(checkpoint.path, weights_only=True)
        updates = list(stub.WatchJob(pb.WatchJobRequest(job_id=job), timeout=120))
        acks = [u.ack for u in updates if u.HasField("ack")]
        assert [a.command_id for a in acks] == [command.command_id] and acks[0].success
        health = [u.health for u in updates if u.HasField("health")]
        assert len(health) == 4 and health[0].layer_id == "0"
        final = [u.epoch_event for u in updates if u.HasField("epoch_event")][-1]
        summary = json.loads(final.message)
        assert 0.5 < summary["test_accuracy"] <= 1.0 and len(summary["epochs"]) == 4
        assert updates[-1].state == pb.JobState.JOB_STATE_SUCCEEDED
        seeds = stub.ListSeeds(pb.ListSeedsRequest(job_id=job))
        assert [r.layer_id for r in seeds.layers] == ["0"]
        # Resume from the checkpoint under a new job: it carries on at the saved epoch with the
        # seed it had germinated.
        resumed = stub.SubmitJob(pb.SubmitJobRequest(recipe="digits", parameters={
            "epochs": "6", "resume_from": checkpoint.path}))
        later = list(stub.WatchJob(pb.WatchJobRequest(job_id=resumed.job_id), timeout=120))
        assert later[-1].state == pb.JobState.JOB_STATE_SUCCEEDED
        epochs = json.loads([u.epoch_event for u in later
                             if u.HasField("epoch_event")][-1].message)["epochs"]
        assert [e["epoch"] for e in epochs] == list(range(checkpoint.epoch + 1, 7))
        first = [u.health for u in later if u.HasField("health")][0]
        assert first.epoch == checkpoint.epoch + 1
        assert stage_from_wire(first.stage[2]) == SeedStage.GERMINATED
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert f'kasmina_seeds{{job_id="{job}",layer="0",stage="TRAINING"}}' in text or \
            f'kasmina_seeds{{job_id="{job}",layer="0",stage="GERMINATED"}}' in text
        # The germinate command waited in its stream until the job started: one lag sample.
        assert f'kasmina_command_lag_seconds_count{{job_id="{job}"}} 1.0' in text, text
        # The command-line client: submits, prints every epoch, exits 0 on success.
        cli = subprocess.run([sys.executable, "-m", "kasmina", "submit", "--address",
                              f"127.0.0.1:{grpc_port}", "--epochs", "2", "--param",
                              "seeded=false"], capture_output=True, text=True, timeout=120,
                             check=False)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "epoch 2: train_loss" in cli.stdout and "JOB_STATE_SUCCEEDED" in cli.stdout
        long = stub.SubmitJob(pb.SubmitJobRequest(recipe="digits",
                                                  parameters={"epochs": "500"}))
        stub.CancelJob(pb.CancelJobRequest(job_id=long.job_id, reason="test"))
        last = list(stub.WatchJob(pb.WatchJobRequest(job_id=long.job_id), timeout=60))[-1]
        assert last.state == pb.JobState.JOB_STATE_CANCELLED
        with pytest.raises(grpc.RpcError) as missing:
            stub.ListSeeds(pb.ListSeedsRequest(job_id="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        channel.close()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        log.close()
    assert code == 0, (tmp_path / "kasmina.log").read_text()


def _start_runtime(env: dict[str, str], log_path, http_port: int) -> subprocess.Popen:
    log = log_path.open("ab")
    process = subprocess.Popen([sys.executable, "-m", "kasmina", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2):
                return process
        except OSError:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "not ready within 60 s"
            time.sleep(0.2)


def _bus_messages(client, stream: str, cls):
    from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope
    return [cls.FromString(Envelope.FromString(fields[b"envelope"]).payload)
            for _, fields in client.xrange(stream)]


def test_a_killed_runtimes_jobs_are_resumed_or_failed_and_no_log_has_the_password(
        oona_restartable_broker: EmbeddedRedis, tmp_path):
    """SIGKILL the runtime mid-job: the next runtime on the same checkpoint directory resumes
    the job that asked for it from its last checkpoint (applying, once, the command the killed
    one held unapplied) and publishes the other failed. The Redis URL carries a password that
    no log line shows."""
    import redis
    from oona.contracts import CommandAck, EpochEvent, EpochEventKind

    plain = redis.Redis.from_url(oona_restartable_broker.url)
    plain.config_set("requirepass", "s3cret-pw")
    url = oona_restartable_broker.url.replace("redis://", "redis://:s3cret-pw@")
    client = redis.Redis.from_url(url)
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, OONA_REDIS_URL=url, KASMINA_GRPC_PORT=str(grpc_port),
               KASMINA_HTTP_PORT=str(http_port), KASMINA_CHECKPOINT_DIR=str(tmp_path / "ckpt"))
    log_path = tmp_path / "kasmina.log"
    process = _start_runtime(env, log_path, http_port)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = pb_grpc.KasminaRuntimeStub(channel)
        resumable, doomed = "resumable-1", "doomed-1"
        stub.SubmitJob(pb.SubmitJobRequest(job_id=resumable, recipe="digits", parameters={
            "epochs": "60", "resume_on_restart": "true", "checkpoint_every": "1"}), timeout=30)
        stub.SubmitJob(pb.SubmitJobRequest(job_id=doomed, recipe="digits", parameters={
            "epochs": "100000", "seeded": "false"}), timeout=30)
        command = LifecycleCommand(command_id=str(uuid.uuid4()), job_id=resumable, layer_id="0",
                                   seed_index=2, apply_at_epoch=45,
                                   germinate=Germinate(blueprint_name="residual_mlp"))
        asyncio.run(_publish(url, command))
        for update in stub.WatchJob(pb.WatchJobRequest(job_id=resumable), timeout=60):
            if update.HasField("epoch_event") and update.epoch_event.epoch >= 5:
                break
        group = f"kasmina-{resumable}"
        deadline = time.monotonic() + 10
        while client.xpending(streams.commands(resumable), group)["pending"] != 1:
            assert time.monotonic() < deadline, "the command never reached the runtime"
            time.sleep(0.05)
        process.kill()  # SIGKILL: no cleanup, the command in hand is unapplied and unacked
        process.wait(30)
        channel.close()
        process = _start_runtime(env, log_path, http_port)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = pb_grpc.KasminaRuntimeStub(channel)
        updates = list(stub.WatchJob(pb.WatchJobRequest(job_id=resumable), timeout=180))
        assert updates[-1].state == pb.JobState.JOB_STATE_SUCCEEDED
        epochs = [u.epoch_event.epoch for u in updates if u.HasField("epoch_event")
                  and u.epoch_event.kind == EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED]
        assert epochs[0] >= 5 and epochs[-1] == 60  # carried on from its last checkpoint
        acks = [u.ack for u in updates if u.HasField("ack")]
        assert [(a.command_id, a.success, a.applied_epoch) for a in acks] == [
            (command.command_id, True, 44)]
        failed = list(stub.WatchJob(pb.WatchJobRequest(job_id=doomed), timeout=30))
        assert failed[-1].state == pb.JobState.JOB_STATE_FAILED
        channel.close()
        events = [e for e in _bus_messages(client, streams.EPOCH_EVENTS, EpochEvent)
                  if e.job_id == doomed]
        assert events[-1].kind == EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED
        bus_acks = [a for a in _bus_messages(client, streams.CONTROL_ACKS, CommandAck)
                    if a.command_id == command.command_id]
        assert len(bus_acks) == 1 and bus_acks[0].success  # applied once across the kill
        deadline = time.monotonic() + 15  # the job's close publishes, then acks deliveries

        def pending() -> int:  # the stream is deleted at the job's end once all were acked
            try:
                return client.xpending(streams.commands(resumable), group)["pending"]
            except redis.ResponseError as error:
                assert "NOGROUP" in str(error), error
                return 0

        while pending() != 0:
            assert time.monotonic() < deadline, "a delivery was left pending"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        plain_after = redis.Redis.from_url(url)
        plain_after.config_set("requirepass", "")
    text = log_path.read_text()
    assert code == 0, text
    assert "s3cret-pw" not in text and ":***@" in text, text
