from __future__ import annotations

import kasmina
import pytest
import torch
from kasmina import ControllerConfig, KasminaConfig, LocalController, SeedStage
from torch import nn
from torch.nn import functional as F


def toy_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=gen)
    y = (x[:, 0] * x[:, 1] > 0).long()  # needs a non-linearity the linear host lacks
    return x, y


def test_local_controller_grows_seeds_through_the_whole_lifecycle():
    x, y = toy_problem()
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    cfg = KasminaConfig(min_training_steps=4, max_training_epochs=3, ramp_steps=4,
                        stabilization_epochs=1, evaluation_epochs=1, fine_tuning_epochs=1,
                        mode="min", fossilize_min_gain=-1.0, embargo_epochs=2,
                        seed_lr=1e-2)
    kasmina.wrap(model, seeds_per_layer=2, config=cfg, exclude=("1",))
    ctl = LocalController(model, ControllerConfig(plateau_epochs=1, min_delta=1.0,
                                                  mode="min"))
    opt = torch.optim.Adam(kasmina.host_parameters(model), lr=1e-2)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    for _ in range(16):
        model.train()
        for idx in torch.arange(256).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.step(loss.detach())
        ctl.end_epoch(val_loss(), evaluate=val_loss)
    reached = {e.to_stage for e in ctl.events}
    assert {SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.GRAFTING,
            SeedStage.STABILIZATION, SeedStage.EVALUATING} <= reached
    assert reached & {SeedStage.FOSSILIZED, SeedStage.CULLED}
    assert ctl.outcomes and all(o.outcome in (SeedStage.FOSSILIZED, SeedStage.CULLED,
                                              SeedStage.ROLLED_BACK) for o in ctl.outcomes)
    evaluated = [o for o in ctl.outcomes if o.contribution is not None]
    assert evaluated  # contributions were measured with counterfactual passes
    assert ctl.state_dict()["best"] is not None


def test_plateau_detection_and_worst_health_seed_choice():
    model = kasmina.wrap(nn.Sequential(nn.Linear(4, 8)), seeds_per_layer=4)
    layer = kasmina.seed_layers(model)[0]
    with torch.no_grad():
        layer.host.weight[2:4] = 0  # seed 1's chunk: dead, zero variance
        layer.host.bias[2:4] = 0
    ctl = LocalController(model, ControllerConfig(plateau_epochs=2, min_delta=0.1))
    model.train()

    def epoch(metric):
        model(torch.randn(32, 4))
        return ctl.end_epoch(metric)

    assert epoch(0.5) == []  # first metric: progress
    assert epoch(0.55) == []  # < min_delta: 1 epoch without progress
    events = epoch(0.52)  # plateau: germinate in the least healthy seed, then promote it
    assert [(e.seed_id, e.to_stage) for e in events] == [(1, SeedStage.GERMINATED),
                                                         (1, SeedStage.TRAINING)]
    ctl2 = LocalController(model)
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2.state_dict() == ctl.state_dict()


def test_controller_needs_seed_layers():
    with pytest.raises(ValueError, match="wrap"):
        LocalController(nn.Linear(2, 2))


def test_demo_main_job_runs_and_writes_results(tmp_path, capsys):
    from kasmina.demo import main
    main(["--epochs", "4", "--runs", "1", "--plateau-epochs", "1", "--min-delta", "10",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "host alone" in out and "host + seeds" in out
    assert (tmp_path / "results.json").exists()
    assert "GERMINATED" in (tmp_path / "events.log").read_text()
