from __future__ import annotations

import logging

import kasmina
import numpy as np
import pytest
import torch
from kasmina import ControllerConfig, KasminaConfig, LocalController, SeedStage
from kasmina.stability import StabilityConfig
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


def dead_chunk_model() -> nn.Module:
    """One seed layer of 4 seeds of 2 features; seed 1's chunk dead (zero variance)."""
    model = kasmina.wrap(nn.Sequential(nn.Linear(4, 8)), seeds_per_layer=4)
    layer = kasmina.seed_layers(model)[0]
    with torch.no_grad():
        layer.host.weight[2:4] = 0
        layer.host.bias[2:4] = 0
    return model


def test_plateau_detection_and_worst_health_seed_choice():
    model = dead_chunk_model()
    ctl = LocalController(model, ControllerConfig(plateau_epochs=2, min_delta=0.1,
                                                  germinations_per_plateau=1))
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


@pytest.mark.parametrize("placement", ["health", "gradient"])
def test_gradient_placement_germinates_where_the_loss_gradient_is(placement):
    """placement="gradient": the dormant seed whose chunk carried the largest mean squared
    loss gradient over the epoch germinates first; "health" still picks the least healthy
    (seed 1's dead chunk), and a loss that reads only seed 3's features changes nothing there."""
    model = dead_chunk_model()
    ctl = LocalController(model, ControllerConfig(plateau_epochs=1, min_delta=0.1,
                                                  germinations_per_plateau=1,
                                                  placement=placement))
    model.train()
    for metric in (0.5, 0.5):
        for _ in range(3):
            out = model(torch.randn(32, 4))
            # some gradient on seed 2's chunk, the most on seed 3's
            ((out[:, 4:6] * 0.01).sum() + (out[:, 6:8] ** 2).sum()).backward()
        events = ctl.end_epoch(metric)
    germinated = [e.seed_id for e in events if e.to_stage is SeedStage.GERMINATED]
    assert germinated == ([3] if placement == "gradient" else [1])
    with pytest.raises(ValueError, match="placement"):
        ControllerConfig(placement="random")


def test_the_output_gradient_is_measured_by_the_layer_and_reported():
    """KasminaConfig.track_output_gradient: the report's output_grad_sq is each chunk's mean
    squared output gradient over the epoch's training steps (NaN when off, in eval mode and
    for a forward with no backward); placement="gradient" turns it on."""
    model = dead_chunk_model()
    layer = kasmina.seed_layers(model)[0]
    model.train()
    model(torch.randn(4, 4)).sum().backward()
    assert np.isnan(layer.end_epoch(0.5).output_grad_sq).all()  # off by default
    LocalController(model, ControllerConfig(placement="gradient"))
    assert layer.config.track_output_gradient
    xs = [torch.randn(5, 4), torch.randn(3, 4)]
    weights = torch.arange(1.0, 9.0)
    want = torch.zeros(8, dtype=torch.float64)
    for x in xs:
        out = model(x)
        (out * weights).sum().backward()  # d loss / d out = weights on every row
        want += (weights.double() ** 2) * x.shape[0]
    with torch.no_grad():
        model(torch.randn(2, 4))  # no gradient: nothing added
    model.eval()
    model(torch.randn(2, 4, requires_grad=True)).sum().backward()  # eval mode: nothing added
    model.train()
    got = layer.end_epoch(0.5).output_grad_sq
    rows = sum(x.shape[0] for x in xs)
    expect = (want / rows).view(4, 2).mean(1).numpy()  # 4 seeds of 2 features
    np.testing.assert_allclose(got, expect, rtol=1e-6)
    assert np.isnan(layer.end_epoch(0.5).output_grad_sq).all()  # reset at the boundary
    assert not any("grad_sq" in k or "grad_rows" in k for k in model.state_dict())  # not saved


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


# The stability guard (kasmina.stability, the rule Tamiyo's policy uses; its own cases are in
# Tamiyo's tests/test_stability.py, run on this copy too). Metrics are binary-exact.
ACCURACY = [0.75, 0.765625, 0.78125, 0.796875, 0.8125]  # +1/64 an epoch: no plateau
LOSS = [1.0, 0.984375, 0.96875, 0.953125, 0.9375]
DEFAULT_GUARD = StabilityConfig()


def _guarded(mode="max", stability=DEFAULT_GUARD, config=None):
    model = kasmina.wrap(nn.Sequential(nn.Linear(4, 8)), seeds_per_layer=4, config=config)
    ctl = LocalController(model, ControllerConfig(plateau_epochs=2, min_delta=2**-8, mode=mode,
                                                  stability=stability))
    model.train()
    return model, ctl


def _boundary(model, ctl, metric):
    model(torch.randn(32, 4))
    return ctl.end_epoch(metric)


def _germinated(events) -> bool:
    return any(e.to_stage == SeedStage.GERMINATED for e in events)


@pytest.mark.parametrize(("mode", "history", "spike"), [
    ("max", ACCURACY, 0.25),  # an accuracy collapses
    ("min", LOSS, 4.0),  # a loss blows up
])
def test_a_metric_spike_pauses_local_germination_until_it_clears(mode, history, spike, caplog):
    metrics = [*history, spike] + [history[-1]] * 4  # a plateau from the spike on
    model, ctl = _guarded(mode, stability=None)
    assert [_germinated(_boundary(model, ctl, m)) for m in metrics].index(True) == 6
    model, ctl = _guarded(mode)
    with caplog.at_level(logging.INFO, logger="kasmina"):
        boundaries = [(_germinated(_boundary(model, ctl, m)), ctl.growth_pause)
                      for m in metrics]
    # Paused at the spike's boundary (5) and the next two; boundary 8 has seen 3 stable epochs.
    assert [g for g, _ in boundaries].index(True) == 8
    assert [p is not None for _, p in boundaries] == [False] * 5 + [True] * 3 + [False] * 2
    assert {p.cause.signal for _, p in boundaries if p} == {"metric_spike"}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("growth paused: metric_spike" in m for m in messages) == 1  # when it starts
    assert sum("growth resumed after 3 stable epochs" in m for m in messages) == 1


def test_a_rise_of_an_accuracy_is_no_spike():
    model, ctl = _guarded("max")
    for metric in [*ACCURACY, 4.0]:
        _boundary(model, ctl, metric)
    assert ctl.growth_pause is None


@pytest.mark.parametrize(("rolled_back", "first_germination"), [((0,), 2), ((0, 1), 5)])
def test_repeated_rollbacks_pause_local_germination(rolled_back, first_germination):
    model, ctl = _guarded()
    layer = kasmina.seed_layers(model)[0]
    germinated = []
    for boundary in range(7):
        if boundary == 1:
            for seed in (0, 1):
                layer.germinate(seed, "residual_mlp", "fixed_ramp")
        if boundary == 2:  # both are TRAINING (promoted at boundary 1)
            for seed in rolled_back:
                layer.transition(seed, SeedStage.ROLLED_BACK, reason="test rollback")
        events = _boundary(model, ctl, 0.5)  # a plateau from boundary 2 on
        germinated += [boundary] if _germinated(events) and boundary != 1 else []
    # Two at boundary 2: paused there and at 3 and 4.
    assert germinated[0] == first_germination
    assert ctl.growth_pause is None  # resumed by boundary 6


def test_a_drifting_blended_seed_pauses_local_germination():
    # A seed learning rate of 1 makes the blueprint's weights run from their EMA (drift 2.7,
    # 1.2, 0.68 at the first three boundaries, measured); the runtime's own rollback on drift
    # is set out of reach so that only the guard acts.
    torch.manual_seed(0)
    config = KasminaConfig(seed_lr=1.0, rollback_drift_limit=1e9, ramp_steps=1000)
    model, ctl = _guarded(config=config)
    layer = kasmina.seed_layers(model)[0]
    layer.germinate(0, "residual_mlp", "fixed_ramp")
    layer.transition(0, SeedStage.TRAINING)
    layer.transition(0, SeedStage.GRAFTING, force=True)
    layer.drain_events()  # the test's own moves
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.1)
    for _ in range(3):
        for _ in range(5):
            loss = model(torch.randn(32, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.step(loss.detach())
        events = ctl.end_epoch(0.5)
        assert not _germinated(events)
    assert float(ctl.reports[0].drift[0]) > StabilityConfig().drift_limit
    assert ctl.growth_pause is not None and ctl.growth_pause.cause.signal == "drift"


def test_the_pause_survives_a_checkpoint_of_the_controller():
    model, ctl = _guarded()
    for metric in [*ACCURACY, 0.25]:
        _boundary(model, ctl, metric)
    state = ctl.state_dict()
    restored = LocalController(model, ctl.config)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    _boundary(model, restored, ACCURACY[-1])
    assert restored.growth_pause is not None and restored.growth_pause.resumes_at == 9
    # A controller checkpoint from before the guard loads, with the guard starting afresh.
    old = LocalController(model, ctl.config)
    old.load_state_dict({"best": state["best"], "epochs_without_progress": 0})
    assert old.state_dict()["stability"] == {"metrics": [], "rollbacks": [],
                                             "instability": None}
