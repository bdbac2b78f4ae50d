"""Growth under torch.distributed (DESIGN §8), on the CPU with gloo and two real processes: the
LocalController grows the same seeds at the same step on every rank, and after every step the
parameters (and, at every epoch boundary, the buffers and stage tables) of both ranks are
bit-identical, and close to one process training on the concatenated batch."""

from __future__ import annotations

import os
import socket

import kasmina
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kasmina import ControllerConfig, KasminaConfig, SeedStage
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


def train(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """The user's loop; under DDP each rank sees its half of every global batch."""
    model = build()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.05)
    ctl = kasmina.LocalController(net, CONTROL)
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


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(train(rank, world), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list, list, list]:
    out = str(tmp_path_factory.mktemp("ddp") / "history")
    mp.start_processes(_worker, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)
    return ranks[0], ranks[1], train(0, 1)


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
