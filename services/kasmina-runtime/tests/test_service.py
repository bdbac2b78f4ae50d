"""The runtime's gRPC service in-process on a real Redis: every SubmitJob field checked against
its bounds, ids checked, paths confined to the checkpoint directory, WatchJob streams and jobs
bounded so that control calls always answer, finished jobs evicted with their metrics, and the
jobs a killed runtime left unfinished reported failed."""

from __future__ import annotations

import json
import threading
import time
import uuid

import grpc
import oona
import pytest
import redis
from kasmina.service import jobs as jobs_module
from kasmina.service.grpc_api import start_grpc_server
from kasmina.service.jobs import JobManager
from kasmina.service.logs import redact
from kasmina.service.registry import DirectoryInUse, JobRegistry
from kasmina.service.settings import ServiceSettings
from oona import streams
from oona.contracts import EpochEvent, EpochEventKind
from oona.proto.kasmina.bus.v1.envelope_pb2 import Envelope
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2 as pb
from oona.proto.kasmina.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from prometheus_client import generate_latest

Code = grpc.StatusCode
LONG = {"epochs": "100000", "seeded": "false"}


@pytest.fixture(name="service")
def _service(oona_redis_url, tmp_path):
    started = []

    def start(**limits):
        manager = JobManager(oona.BusSettings.from_dsn(oona_redis_url), tmp_path / "ckpt",
                             limits.pop("max_jobs", 20), limits.pop("max_finished_jobs", 100))
        server, port = start_grpc_server(manager, "127.0.0.1", 0, **limits)
        manager.address = f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((manager, server, channel))
        return manager, pb_grpc.KasminaRuntimeStub(channel)

    yield start
    for manager, server, channel in started:
        manager.cancel_all("test over")
        for job in manager.jobs.values():
            if job.thread.is_alive():
                job.thread.join(30)
        channel.close()
        server.stop(0)


def submit(stub, job_id="", **parameters):
    return stub.SubmitJob(pb.SubmitJobRequest(job_id=job_id, recipe="digits",
                                              parameters=parameters), timeout=10)


def refused(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


OUT_OF_RANGE = [("epochs", "-5"), ("epochs", "1000000000000"), ("hidden", "1000000000"),
                ("bottleneck", "0"), ("seeds_per_layer", "0"), ("seed", "-1"), ("lr", "nan"),
                ("lr", "0"), ("seed_lr", "inf"), ("weight_decay", "-1"), ("batch_size", "0"),
                ("batch_size", "1e9"), ("checkpoint_every", "-1"),
                ("resume_on_restart", "maybe"), ("no_such_field", "1")]


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_submit_refuses_each_out_of_range_parameter_naming_it(service, field, value):
    manager, stub = service()
    code, details = refused(lambda: submit(stub, **{field: value}))
    assert code == Code.INVALID_ARGUMENT and field in details, details
    assert manager.jobs == {}


def test_submit_refuses_bad_ids_recipes_and_cross_field_values(service):
    manager, stub = service()
    before = len(generate_latest())
    for job_id in ("x" * 200_000, "../../x", "a/b", "{tag}", "-leading-dash", "a" * 129):
        code, details = refused(lambda job_id=job_id: submit(stub, job_id, **LONG))
        assert code == Code.INVALID_ARGUMENT and "job_id" in details and len(details) < 300
    code, details = refused(lambda: submit(stub, "ok", seeds_per_layer="65", hidden="64"))
    assert code == Code.INVALID_ARGUMENT and "seeds_per_layer" in details
    code, details = refused(lambda: stub.SubmitJob(pb.SubmitJobRequest(recipe="nope")))
    assert code == Code.INVALID_ARGUMENT and "recipe" in details
    code, _ = refused(lambda: submit(stub, **{f"p{i}": "1" for i in range(40)}))
    assert code == Code.INVALID_ARGUMENT
    assert manager.jobs == {} and len(generate_latest()) - before < 2_000


def test_paths_stay_inside_the_checkpoint_directory(service, tmp_path):
    manager, stub = service()
    job = submit(stub, f"j-{uuid.uuid4().hex[:6]}", **LONG).job_id
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    inside = tmp_path / "ckpt" / "someone-elses.pt"
    inside.write_text("theirs")
    (tmp_path / "ckpt" / "link.pt").symlink_to(outside)
    for path, code in ((str(outside), Code.PERMISSION_DENIED),
                       ("../precious.txt", Code.PERMISSION_DENIED),
                       ("link.pt", Code.PERMISSION_DENIED),  # a symlink out of the directory
                       ("someone-elses.pt", Code.PERMISSION_DENIED),  # not this job's file
                       ("bad\0name.pt", Code.INVALID_ARGUMENT),
                       ("x" * 300 + ".pt", Code.INVALID_ARGUMENT),  # a name over 255
                       ("a/" * 600 + "x.pt", Code.INVALID_ARGUMENT)):  # a path over 1024
        got, _ = refused(lambda path=path: stub.CheckpointJob(
            pb.CheckpointJobRequest(job_id=job, path=path), timeout=30))
        assert got == code, path
    assert outside.read_text() == "keep me" and inside.read_text() == "theirs"
    first = stub.CheckpointJob(pb.CheckpointJobRequest(job_id=job, path="mine.pt"), timeout=30)
    again = stub.CheckpointJob(pb.CheckpointJobRequest(job_id=job, path=first.path), timeout=30)
    assert first.path == again.path == str((tmp_path / "ckpt" / "mine.pt").resolve())
    assert again.epoch > first.epoch  # its own checkpoint: overwritten
    code, _ = refused(lambda: submit(stub, resume_from=str(outside), **LONG))
    assert code == Code.PERMISSION_DENIED
    code, details = refused(lambda: submit(stub, resume_from="missing.pt", **LONG))
    assert code == Code.INVALID_ARGUMENT and "resume_from" in details
    code, _ = refused(lambda: submit(stub, resume_from="../../etc/passwd", **LONG))
    assert code == Code.PERMISSION_DENIED


def test_watch_streams_are_bounded_and_control_calls_still_answer(service):
    manager, stub = service(workers=16, max_watchers=12)
    job = submit(stub, f"w-{uuid.uuid4().hex[:6]}", **LONG).job_id
    streams_ = [stub.WatchJob(pb.WatchJobRequest(job_id=job)) for _ in range(17)]
    results: list[object] = [None] * 17

    def first_update(i):
        try:
            results[i] = next(iter(streams_[i])).job_id
        except grpc.RpcError as err:
            results[i] = err.code()

    threads = [threading.Thread(target=first_update, args=(i,)) for i in range(17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(job) == 12 and results.count(Code.RESOURCE_EXHAUSTED) == 5, results
    # 12 streams hold 12 of the 16 workers: unary calls answer at once.
    started = time.monotonic()
    stub.ListSeeds(pb.ListSeedsRequest(job_id=job), timeout=5)
    assert submit(stub, f"x-{uuid.uuid4().hex[:6]}", epochs="1", seeded="false").job_id
    assert time.monotonic() - started < 5
    for s in streams_:
        s.cancel()
    # Cancelled streams give their slots back (checked every second by the stream loop).
    deadline = time.monotonic() + 10
    while True:
        try:
            next(iter(stub.WatchJob(pb.WatchJobRequest(job_id=job), timeout=5)))
            break
        except grpc.RpcError as err:
            assert err.code() == Code.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.5)
    stub.CancelJob(pb.CancelJobRequest(job_id=job), timeout=5)


def test_concurrent_jobs_are_limited_and_finished_ones_evicted(service):
    manager, stub = service(max_jobs=1, max_finished_jobs=1)
    long = submit(stub, "long-job", **LONG).job_id
    code, details = refused(lambda: submit(stub, "second", **LONG))
    assert code == Code.RESOURCE_EXHAUSTED and "KASMINA_MAX_JOBS" in details
    stub.CancelJob(pb.CancelJobRequest(job_id=long), timeout=5)
    manager.jobs[long].thread.join(30)
    for name in ("short-1", "short-2"):
        submit(stub, name, epochs="1", seeded="false")
        manager.jobs[name].thread.join(30)
    assert set(manager.jobs) == {"short-1", "short-2"}  # long-job evicted first
    text = generate_latest().decode()
    assert 'job_id="long-job"' not in text and 'job_id="short-1"' in text
    code, _ = refused(lambda: stub.ListSeeds(pb.ListSeedsRequest(job_id=long), timeout=5))
    assert code == Code.NOT_FOUND


def test_jobs_a_dead_runtime_left_running_are_reported_failed(service, oona_redis_url,
                                                              tmp_path):
    dead = JobRegistry(tmp_path / "ckpt")
    dead.started("orphan-1", "digits", {"epochs": "50"})
    dead.close()  # the runtime died: its lock on the directory is gone with it
    client = redis.Redis.from_url(oona_redis_url)
    # ...with a command in hand (pending in its group), which no runtime will ever answer
    client.xgroup_create(streams.commands("orphan-1"), "kasmina-orphan-1", id="0",
                         mkstream=True)
    client.xadd(streams.commands("orphan-1"), {b"envelope": b"a command"})
    assert client.xreadgroup("kasmina-orphan-1", "dead", {streams.commands("orphan-1"): ">"})
    manager, stub = service()
    manager.recover()
    updates = list(stub.WatchJob(pb.WatchJobRequest(job_id="orphan-1"), timeout=10))
    assert updates[-1].state == pb.JobState.JOB_STATE_FAILED
    assert json.loads((tmp_path / "ckpt" / "jobs.json").read_text()) == {}
    assert not client.exists(streams.commands("orphan-1"))  # a bounded bus: gone with the job
    events = [EpochEvent.FromString(Envelope.FromString(f[b"envelope"]).payload)
              for _, f in client.xrange(streams.EPOCH_EVENTS)]
    mine = [e for e in events if e.job_id == "orphan-1"]
    assert [e.kind for e in mine] == [EpochEventKind.EPOCH_EVENT_KIND_JOB_FAILED]


def test_one_runtime_owns_a_checkpoint_directory(tmp_path):
    owner = JobRegistry(tmp_path / "ckpt")
    with pytest.raises(DirectoryInUse, match="KASMINA_CHECKPOINT_DIR"):
        JobRegistry(tmp_path / "ckpt")  # a second runtime on it would fail the first's jobs
    owner.close()
    JobRegistry(tmp_path / "ckpt").close()  # free again once the owner is gone


def test_settings_keep_watchers_below_workers_and_logs_hide_secrets():
    assert ServiceSettings.from_env({}).max_watchers < ServiceSettings.from_env({}).grpc_workers
    with pytest.raises(ValueError, match="KASMINA_MAX_WATCHERS"):
        ServiceSettings.from_env({"KASMINA_GRPC_WORKERS": "8", "KASMINA_MAX_WATCHERS": "8"})
    assert redact("bus redis://kasmina:s3cr%40t@redis:6379/0") == (
        "bus redis://kasmina:***@redis:6379/0")
    assert "hunter2" not in redact("OONA_REDIS_PASSWORD=hunter2 and token: abc")
    assert jobs_module.RECIPES == ("digits",)


def test_the_log_filter_masks_a_password_passed_as_an_argument_or_in_a_traceback():
    import io
    import logging

    from kasmina.service.logs import RedactingFilter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(f"test-redact-{uuid.uuid4().hex[:6]}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.warning("bus %s", "redis://:hunter2@redis:6379/0")
    try:
        raise ConnectionError("cannot reach rediss://app:hunter2@redis:6380")
    except ConnectionError:
        logger.exception("failed")
    text = out.getvalue()
    assert "hunter2" not in text and "bus redis://:***@redis" in text, text
    assert "ConnectionError: cannot reach rediss://app:***@redis:6380" in text, text


def test_the_submit_client_reports_a_refusal_without_a_traceback(service, capsys):
    from kasmina import submit as client

    manager, _stub = service()
    assert client.main(["--address", manager.address, "--param", "hidden=1000000000"]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "hidden" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as usage:
        client.main(["--address", manager.address, "--param", "no-equals-sign"])
    assert usage.value.code == 2 and "NAME=VALUE" in capsys.readouterr().err
    assert client.main(["--address", manager.address, "--job-id", "", "--epochs", "1",
                        "--param", "seeded=false"]) == 0  # the runtime names the job
    assert "JOB_STATE_SUCCEEDED" in capsys.readouterr().out


def test_ack_reasons_are_named_and_every_series_starts_at_zero():
    from kasmina.service import metrics
    from oona.contracts import AckReason
    from prometheus_client import REGISTRY

    assert metrics.ack_reason(AckReason.ACK_REASON_OK) == "OK"  # as Tamiyo names them
    metrics.start_job("job-zero")
    sample = {"job_id": "job-zero", "reason": "EMERGENCY_STOPPED"}
    assert REGISTRY.get_sample_value("kasmina_commands_total", sample) == 0.0
    metrics.forget_job("job-zero", [])
    assert REGISTRY.get_sample_value("kasmina_commands_total", sample) is None
