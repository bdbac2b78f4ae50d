"""Growth under torch.distributed (DESIGN §8), on the CPU with gloo and two real processes: the
LocalController grows the same seeds at the same step on every rank, and after every step the
parameters (and, at every epoch boundary, the buffers and stage tables) of both ranks are
bit-identical, and close to one process training on the concatenated batch."""

from __future__ import annotations

import dataclasses
import gc
import os
import time

import kasmina
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kasmina import ControllerConfig, KasminaConfig, SeedStage
from oona.embedded import free_port
from torch import nn

EPOCHS, STEPS, ROWS = 8, 6, 32  # ROWS: the global batch; each of two ranks gets half
CONFIG = KasminaConfig(max_active_seeds=3, min_training_steps=2, reconstruction_threshold=1.0,
                       ramp_steps=4, stabilization_epochs=1, evaluation_epochs=1,
                       fine_tuning_epochs=1, embargo_epochs=1, fossilize_min_gain=-1.0,
                       seed_lr=1e-2, mode="min")
CONTROL = ControllerConfig(plateau_epochs=1, min_delta=1e9, germinations_per_plateau=2,
                           mode="min", blueprints=("residual_mlp", "low_rank"))


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.GELU(), nn.Linear(20, 20), nn.GELU(),
                          nn.Linear(20, 2))
    return kasmina.wrap(model, seeds_per_layer=5, config=CONFIG, exclude=["4"])


def data(epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * epoch + step)
    x = torch.randn(ROWS, 6, generator=g)
    return x, torch.stack([x[:, :3].sum(1).sin(), x[:, 3:].prod(1)], 1)


def snapshot(model: nn.Module, buffers: bool) -> dict[str, torch.Tensor]:
    snap = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    if buffers:
        snap.update({f"b:{n}": b.clone() for n, b in model.named_buffers()})
    return snap


def train(rank: int, world: int, control: ControllerConfig = CONTROL
          ) -> list[dict[str, torch.Tensor]]:
    """The user's loop; under DDP each rank sees its half of every global batch."""
    model = build()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.05)
    ctl = kasmina.LocalController(net, control)
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    x_val, y_val = data(99, 0)
    history = []

    def validate() -> float:
        net.eval()
        with torch.no_grad():
            return float(nn.functional.mse_loss(net(x_val), y_val))

    for epoch in range(EPOCHS):
        net.train()
        for step in range(STEPS):
            x, y = data(epoch, step)
            loss = nn.functional.mse_loss(net(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.step(loss.detach())
            history.append(snapshot(model, buffers=False))
        if epoch == 5:  # an operator's rollback, applied by every rank at the same boundary
            layer = ctl.layers[0]
            for seed in layer.seeds_in(SeedStage.TRAINING, SeedStage.GRAFTING)[:1]:
                layer.transition(seed, SeedStage.ROLLED_BACK, reason="test rollback")
        ctl.end_epoch(validate(), evaluate=validate)
        snap = snapshot(model, buffers=True)
        for layer in ctl.layers:
            snap[f"t:{layer.layer_id}"] = torch.from_numpy(layer.table.state.copy())
        history.append(snap)
    history.append({"events": [(e.layer_id, e.seed_id, int(e.to_stage), e.epoch)
                               for e in ctl.events]})
    return history


def _worker(rank: int, world: int, port: int, out: str, run, *args) -> None:
    """One gloo rank: `run(rank, world, *args)`, its result saved to `out.<rank>`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(run(rank, world, *args), f"{out}.{rank}")
        dist.barrier()  # both ranks done: neither tears gloo down under the other
    finally:
        # Rank 1 once died in CI at its exit (SIGABRT, "terminate called without an active
        # exception"), not reproduced here (9 runs, 2 under CPU load). Suspected: gloo work
        # still held in reference cycles (DDP's reducer) when the group is destroyed; they
        # are freed first now.
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list, list, list]:
    out = str(tmp_path_factory.mktemp("ddp") / "history")
    mp.start_processes(_worker, args=(2, free_port(), out, train), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: the same summation order in every matmul
    try:
        return ranks[0], ranks[1], train(0, 1)
    finally:
        torch.set_num_threads(threads)


def test_ranks_stay_bit_identical_through_a_whole_lifecycle(runs):
    rank0, rank1, _ = runs
    assert len(rank0) == len(rank1)
    for i, (a, b) in enumerate(zip(rank0, rank1, strict=True)):
        if "events" in a:
            assert a == b
            continue
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) or (
                a[key].is_floating_point() and torch.equal(a[key].isnan(), b[key].isnan())
                and torch.equal(a[key].nan_to_num(), b[key].nan_to_num())), (i, key)
    ended = {stage for _, _, stage, _ in rank0[-1]["events"]}
    # the lifecycle went through growth and both kinds of ending
    assert {SeedStage.GRAFTING, SeedStage.FOSSILIZED, SeedStage.ROLLED_BACK} <= ended


def test_two_ranks_match_one_process_on_the_whole_batch(runs):
    rank0, _, single = runs
    assert rank0[-1] == single[-1]  # the same decisions, at the same epochs
    for a, b in zip(rank0[:-1], single[:-1], strict=True):
        for key in a:
            if key.startswith("p:"):  # averaged gradients: equal up to float32 rounding
                torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
            elif key.startswith("t:"):
                assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- the fleet bridge on two ranks
def test_gradient_placement_germinates_alike_on_every_rank(tmp_path):
    """ControllerConfig(placement="gradient") reads each rank's own output gradients (its half
    of the batch): the layers' sums are summed over the ranks at the boundary (the telemetry's
    reduction), so every rank germinates the same seeds and the ranks stay bit-identical."""
    out = str(tmp_path / "history")
    control = dataclasses.replace(CONTROL, placement="gradient")
    mp.start_processes(_worker, args=(2, free_port(), out, train, control), nprocs=2,
                       start_method="spawn")
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=False) for r in range(2))
    assert rank0[-1]["events"] == rank1[-1]["events"]
    assert any(e[2] == int(SeedStage.GERMINATED) for e in rank0[-1]["events"])
    for a, b in zip(rank0[:-1], rank1[:-1], strict=True):
        for key in a:  # (NaN where a lane has no reconstruction yet)
            assert torch.equal(a[key].nan_to_num(), b[key].nan_to_num()), key
            assert not a[key].is_floating_point() or torch.equal(a[key].isnan(),
                                                                 b[key].isnan()), key


def measure_output_gradients(rank: int, world: int) -> list:
    """One epoch of the user's loop with the output gradients measured: each layer's reported
    output_grad_sq after the boundary (all seeds dormant, so no rank's path differs)."""
    torch.manual_seed(0)
    config = dataclasses.replace(CONFIG, track_output_gradient=True)
    model = kasmina.wrap(nn.Sequential(nn.Linear(6, 20), nn.GELU(), nn.Linear(20, 20),
                                       nn.GELU(), nn.Linear(20, 2)),
                         seeds_per_layer=5, config=config, exclude=["4"])
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.05)
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    for step in range(STEPS):
        x, y = data(0, step)
        loss = nn.functional.mse_loss(net(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [layer.end_epoch(0.0).output_grad_sq for layer in kasmina.seed_layers(model)]


def test_output_gradients_on_two_ranks_read_as_one_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "grads")
    mp.start_processes(_worker, args=(2, free_port(), out, measure_output_gradients), nprocs=2,
                       start_method="spawn")
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=False) for r in range(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = measure_output_gradients(0, 1)
    finally:
        torch.set_num_threads(threads)
    assert len(single) == 2 and all(np.isfinite(g).all() and (g > 0).all() for g in single)
    for a, b, c in zip(rank0, rank1, single, strict=True):
        np.testing.assert_array_equal(a, b)  # every rank reports the same sums
        np.testing.assert_allclose(a, c, rtol=1e-4)  # and one process's on the whole batch


def fleet_commands(job: str) -> list:
    from oona.contracts import Advance, Cull, Germinate, LifecycleCommand, Rollback, stage_to_wire

    def cmd(seed, at=None, **action):
        c = LifecycleCommand(command_id=f"{job}-{len(made)}", job_id=job, layer_id="0",
                             seed_index=seed, **action)
        if at is not None:
            c.apply_at_epoch = at
        made.append(c)

    made: list = []
    for seed in (1, 2):
        cmd(seed, at=1, germinate=Germinate(blueprint_name="residual_mlp"))
        cmd(seed, at=1, advance=Advance(target_stage=stage_to_wire(SeedStage.TRAINING)))
    cmd(3, at=1, germinate=Germinate(blueprint_name="no_such_blueprint"))  # refused, once
    cmd(2, at=3, cull=Cull())
    cmd(1, at=4, rollback=Rollback())
    return made


def fleet_train(rank: int, world: int, url: str, job: str) -> dict:
    import oona

    model = build()
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.05)
    runtime = kasmina.attach(net, job, oona.BusSettings.from_dsn(url) if rank == 0 else None,
                             mode="min")
    expected = len(fleet_commands(job))
    if rank == 0:  # every command is in before the first boundary, so the run is exact
        start, arrived = time.monotonic(), 0
        while arrived < expected and time.monotonic() - start < 30:
            arrived += len(runtime.take_command_lags())  # one lag per arrival
            time.sleep(0.05)
        assert arrived == expected
    dist.barrier()
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    out: dict = {"tables": [], "acks": []}
    try:
        for epoch in range(5):
            for step in range(STEPS):
                x, y = data(epoch, step)
                loss = nn.functional.mse_loss(net(x[rows]), y[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                runtime.step(loss.detach())
            acks = runtime.end_epoch(float(loss.detach()))
            out["acks"].append([(a.command_id, a.success, a.reason) for a in acks])
            out["tables"].append(model[0].table.state.copy())  # layer "0": the commands' layer
    finally:
        runtime.close()
    return out


def test_a_job_on_two_ranks_applies_each_command_once_at_the_same_boundary(oona_redis_url,
                                                                          tmp_path):
    import asyncio
    import uuid

    import oona
    from oona import streams
    from oona.contracts import CommandAck, LayerHealthReport

    job = f"ddp-{uuid.uuid4().hex[:8]}"
    commands = fleet_commands(job)

    async def publish():
        async with oona.open_bus(oona.BusSettings.from_dsn(oona_redis_url)) as bus:
            publisher = bus.publisher("test")
            for c in commands:
                await publisher.publish(streams.commands(job), c, event_id=c.command_id)

    async def collect(stream, cls):
        got = []

        async def on(message, _delivery):
            got.append(message)

        async with oona.open_bus(oona.BusSettings.from_dsn(oona_redis_url)) as bus:
            consumer = bus.consumer(stream, group=f"t-{uuid.uuid4()}", name="t",
                                    handlers={cls: on})
            await consumer.ensure_group()
            while await consumer.poll(block_ms=200):
                pass
        return [m for m in got if m.job_id == job]

    asyncio.run(publish())
    out = str(tmp_path / "fleet")
    mp.start_processes(_worker, args=(2, free_port(), out, fleet_train, oona_redis_url, job),
                       nprocs=2, start_method="spawn")
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=False) for r in range(2))
    assert rank0["acks"] == rank1["acks"]  # the same commands, at the same boundary, each rank
    assert all((a == b).all() for a, b in zip(rank0["tables"], rank1["tables"], strict=True))
    by_boundary = [[cid for cid, _, _ in acks] for acks in rank0["acks"]]
    assert by_boundary[0] == [c.command_id for c in commands[:5]]
    assert by_boundary[2] == [commands[5].command_id]  # due at epoch 3
    assert by_boundary[3] == [commands[6].command_id]  # due at epoch 4
    assert [ok for _, ok, _ in rank0["acks"][0]] == [True, True, True, True, False]
    assert rank0["tables"][-1][1, 0] == SeedStage.ROLLED_BACK
    # only rank 0 published: one ack per command, one health report per layer and boundary
    wire = asyncio.run(collect(streams.CONTROL_ACKS, CommandAck))
    assert sorted(a.command_id for a in wire) == sorted(c.command_id for c in commands)
    reports = asyncio.run(collect(streams.TELEMETRY_SEED_HEALTH, LayerHealthReport))
    assert sorted((r.layer_id, r.epoch) for r in reports) == [
        (layer, epoch) for layer in ("0", "2") for epoch in range(1, 6)]
