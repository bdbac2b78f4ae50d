"""One job on two ranks attached to a real bus and a real Tamiyo (DESIGN §5, §8; issue #11).

A real `python -m tamiyo` (told that every epoch is a plateau, Karn down so it germinates its
fallback, residual_mlp) drives a 2-rank gloo DDP job through `kasmina.attach`: rank 0 consumes
the job's commands and publishes, rank 1 has no bus at all. Tamiyo's commands arrive whenever
they arrive (the ranks sleep a little each epoch so they land between boundaries); whatever
the timing, both ranks must return the same acks at the same boundaries and hold the same
stage tables after every boundary, and the bus must carry each ack once and one health report
per layer per boundary."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import kasmina
import numpy as np
import oona
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kasmina import KasminaConfig, SeedStage
from oona import streams
from oona.contracts import (
    CommandAck,
    EpochEvent,
    EpochEventKind,
    LayerHealthReport,
    LifecycleCommand,
)
from oona.embedded import free_port
from torch import nn

pytestmark = pytest.mark.integration

EPOCHS, STEPS, ROWS = 16, 4, 32  # ROWS: the global batch; each of two ranks gets half
PAUSE_S = 0.3  # per epoch, after the boundary: Tamiyo's commands land before the next one
LAYERS = ("0", "2")
# Commands due this close to the end may still be on their way when the job ends.
TAIL_EPOCHS = 2
CONFIG = KasminaConfig(max_active_seeds=3, min_training_steps=2, reconstruction_threshold=1.0,
                       ramp_steps=4, stabilization_epochs=1, evaluation_epochs=1,
                       fine_tuning_epochs=1, embargo_epochs=1, fossilize_min_gain=-1.0,
                       seed_lr=1e-2, mode="min", track_output_gradient=True)
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.GELU(), nn.Linear(20, 20), nn.GELU(),
                          nn.Linear(20, 2))
    return kasmina.wrap(model, seeds_per_layer=4, config=CONFIG, exclude=["4"])


def data(epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * epoch + step)
    x = torch.randn(ROWS, 6, generator=g)
    return x, torch.stack([x[:, :3].sum(1).sin(), x[:, 3:].prod(1)], 1)


def _ack_row(ack: CommandAck) -> tuple:
    return (ack.command_id, ack.success, int(ack.reason), ack.message, int(ack.stage_before),
            int(ack.stage_after), ack.applied_epoch, ack.applied_step)


def train(rank: int, world: int, url: str, job: str) -> dict:
    """The user's loop on one rank: its half of every batch, the same val metric everywhere."""
    model = build()
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.05)
    runtime = kasmina.attach(net, job, oona.BusSettings.from_dsn(url) if rank == 0 else None,
                             mode="min")
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    x_val, y_val = data(99, 0)

    def validate() -> float:  # the whole validation set on every rank
        net.eval()
        with torch.no_grad():
            return float(nn.functional.mse_loss(net(x_val), y_val))

    out: dict = {"acks": [], "tables": [], "lags": []}
    try:
        for epoch in range(EPOCHS):
            net.train()
            for step in range(STEPS):
                x, y = data(epoch, step)
                loss = nn.functional.mse_loss(net(x[rows]), y[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                runtime.step(loss.detach())
            acks = runtime.end_epoch(validate(), evaluate=validate)
            out["acks"].append([_ack_row(a) for a in acks])
            out["tables"].append({layer.layer_id: layer.table.state.copy()
                                  for layer in runtime.layers})
            out["lags"] += runtime.take_command_lags()
            time.sleep(PAUSE_S)
        if rank == 0:  # the job's command stream is deleted when the runtime closes it
            sent = _collect(url, job, streams.commands(job), LifecycleCommand)
            out["commands"] = {c.command_id: (c.WhichOneof("action"), c.apply_at_epoch)
                               for c in sent}
            out["germinations"] = [c.rationale for c in sent
                                   if c.WhichOneof("action") == "germinate"]
    finally:
        runtime.close()
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _worker(rank: int, world: int, port: int, out: str, url: str, job: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(train(rank, world, url, job), f"{out}.{rank}")
        dist.barrier()  # both ranks done: neither tears gloo down under the other
    finally:
        gc.collect()  # what reference cycles hold of gloo goes before the group (test_distributed)
        dist.destroy_process_group()


# ---------------------------------------------------------------- Tamiyo, a real process
def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def _start_tamiyo(url: str, job: str, log: Path) -> subprocess.Popen[bytes]:
    """`python -m tamiyo` on the bus, deciding fast; returns once /readyz says ready."""
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAMIYO_", "KARN_"))}
    env.update(OONA_REDIS_URL=url, TAMIYO_HTTP_PORT=str(http_port),
               TAMIYO_GRPC_PORT=str(free_port()), TAMIYO_SHUTDOWN_GRACE_S="5",
               TAMIYO_CONSUMER_NAME=f"tamiyo-{job}",
               # Karn is down: every germination is the fallback, which the list allows
               TAMIYO_KARN_ADDRESS=f"127.0.0.1:{free_port()}", TAMIYO_KARN_TIMEOUT_S="0.5",
               TAMIYO_BLUEPRINTS="residual_mlp", TAMIYO_PLACEMENT="gradient",
               # every epoch is a plateau; no cooldown: it germinates again at the very next epoch
               TAMIYO_PLATEAU_EPOCHS="1", TAMIYO_MIN_DELTA="100", TAMIYO_COOLDOWN_EPOCHS="0",
               TAMIYO_TICK_S="0.1", TAMIYO_REPORT_GRACE_S="0.2", TAMIYO_ACK_TIMEOUT_S="30")
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "tamiyo"], env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"tamiyo exited at start:\n{log.read_text()}")
        try:
            if _get(http_port, "/readyz") == 200:
                return process
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"tamiyo not ready:\n{log.read_text()}")
        time.sleep(0.1)


def _collect(url: str, job: str, stream: str, cls: type) -> list:
    """Every message of `cls` on `stream` for this job, from the stream's beginning."""
    async def body() -> list:
        got = []

        async def on(message: object, _delivery: oona.Delivery) -> None:
            got.append(message)

        async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
            consumer = bus.consumer(stream, group=f"t-{uuid.uuid4()}", name="t",
                                    handlers={cls: on})
            await consumer.ensure_group()
            while await consumer.poll(block_ms=200):
                pass
        return [m for m in got if m.job_id == job]

    return asyncio.run(body())


def test_a_job_on_two_ranks_grows_under_a_real_tamiyo(oona_redis_url, tmp_path):
    job = f"ddp-fleet-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "tamiyo.log"
    tamiyo = _start_tamiyo(oona_redis_url, job, log)
    try:
        out = str(tmp_path / "rank")
        mp.start_processes(_worker, args=(2, free_port(), out, oona_redis_url, job), nprocs=2,
                           start_method="spawn")
        rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=False) for r in range(2))
        time.sleep(0.5)  # Tamiyo's decision on the last epoch and its handling of the job's end
    finally:
        if tamiyo.poll() is None:
            tamiyo.send_signal(signal.SIGTERM)
            try:
                tamiyo.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                tamiyo.kill()
                tamiyo.wait()
    logs = log.read_text()
    assert tamiyo.returncode == 0, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]

    # Both ranks: the same acks at the same boundaries, the same stage tables after every one.
    assert len(rank0["acks"]) == len(rank1["acks"]) == EPOCHS
    assert rank0["acks"] == rank1["acks"]
    for boundary, (a, b) in enumerate(zip(rank0["tables"], rank1["tables"], strict=True)):
        assert a.keys() == b.keys() == set(LAYERS)
        for layer in LAYERS:
            assert np.array_equal(a[layer], b[layer]), (boundary, layer, a[layer], b[layer])
    for name, value in rank0["params"].items():  # and the same model at the end
        assert torch.equal(value, rank1["params"][name]) or torch.equal(
            value.nan_to_num(), rank1["params"][name].nan_to_num()), name

    # Tamiyo's commands were applied: a germination went through and a seed left DORMANT.
    commands = rank0["commands"]
    acked = {row[0]: row for acks in rank0["acks"] for row in acks}
    assert len(acked) == sum(map(len, rank0["acks"])), "a command applied twice"
    assert set(acked) <= set(commands), "an ack for a command Tamiyo never sent"
    germinated = [cid for cid, row in acked.items()
                  if commands[cid][0] == "germinate" and row[1]]
    assert germinated, (rank0["acks"], logs[-3000:])
    assert any((table[layer][:, 0] != SeedStage.DORMANT).any()
               for table in rank0["tables"] for layer in LAYERS)
    # Whatever reached rank 0 in time was applied: only the last epochs' commands may be left.
    late = sorted((at, cid) for cid, (_, at) in commands.items() if cid not in acked)
    assert all(at > EPOCHS - TAIL_EPOCHS for at, _ in late), (late, rank0["lags"])

    # On the bus, only rank 0 published: each applied command acked once (and the commands
    # still due when the job ended answered once at close), one health report per layer per
    # boundary, one end event per boundary.
    wire_acks = _collect(oona_redis_url, job, streams.CONTROL_ACKS, CommandAck)
    at_close = {a.command_id for a in wire_acks if a.message.startswith("the job ended")}
    assert at_close <= {cid for _, cid in late}, (at_close, late)
    wire = Counter(a.command_id for a in wire_acks if a.command_id not in at_close)
    assert wire == Counter(acked.keys()), (wire, acked)
    assert Counter(a.command_id for a in wire_acks if a.command_id in at_close) == Counter(
        at_close)
    reports = _collect(oona_redis_url, job, streams.TELEMETRY_SEED_HEALTH, LayerHealthReport)
    assert sorted((r.layer_id, r.epoch) for r in reports) == [
        (layer, epoch) for layer in LAYERS for epoch in range(1, EPOCHS + 1)]
    # Placement by the output gradient: both ranks' sums in every report, and Tamiyo germinated
    # by them (TAMIYO_PLACEMENT=gradient, KasminaConfig.track_output_gradient).
    assert all(len(r.output_grad_sq) == r.num_seeds and min(r.output_grad_sq) > 0
               for r in reports)
    assert rank0["germinations"] and all("largest output gradient" in why
                                         for why in rank0["germinations"])
    events = _collect(oona_redis_url, job, streams.EPOCH_EVENTS, EpochEvent)
    ended = [e.epoch for e in events if e.kind == EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED]
    assert ended == list(range(1, EPOCHS + 1))
