"""kasmina.controls: the grown architecture without a lifecycle (make run's and the efficacy
harness's static-final and insertion). Each branch is its blueprint's function and the identity
when it appears; insertion switches branches in at their epoch; the grown architecture is read
back from health reports as the fleet sends them; controls train their branches as the seeds'
optimiser trains a seed's."""

from __future__ import annotations

import pytest
import torch
from kasmina import get_blueprint
from kasmina.blueprints import forward_of
from kasmina.controls import (
    Branch,
    BranchedLinear,
    InsertionSchedule,
    branches_from_health,
    install,
)
from kasmina.lifecycle import SeedStage
from kasmina.recipes import DigitsParams, build_model, load_digits_split, train_digits
from oona.contracts import LayerHealthReport, stage_to_wire
from torch import nn

S = SeedStage


@pytest.mark.parametrize("blueprint", ["residual_mlp", "low_rank", "linear"])
def test_a_branch_is_the_identity_when_it_appears_and_its_blueprint_after_training(blueprint):
    torch.manual_seed(0)
    host = nn.Linear(12, 13)
    layer = BranchedLinear(host, [Branch("0", 5, 11, blueprint)], seed=3)
    x = torch.randn(7, 12)
    assert torch.equal(layer(x), host(x))
    for p in layer.branch_parameters():  # any trained values
        p.data.normal_()
    h = host(x)
    params = {k: v.unsqueeze(0) for k, v in layer.weights[0].items()}
    chunk = forward_of(get_blueprint(blueprint))(params, h[:, 5:11].unsqueeze(0))[0]  # (7, 6)
    expected = torch.cat([h[:, :5], chunk, h[:, 11:]], dim=1)
    torch.testing.assert_close(layer(x), expected)
    assert layer.active_params() == get_blueprint(blueprint).param_count(6)


def test_residual_branches_draw_the_fan_in_bounds_in_branch_order():
    layer = BranchedLinear(nn.Linear(4, 32), [Branch("0", 16, 32, "residual_mlp"),
                                             Branch("0", 0, 16, "residual_mlp")], seed=1)
    assert [b.start for b in layer.branches] == [0, 16]
    w1 = layer.weights[0]["w1"]
    assert w1.shape == (16, 16) and 0 < w1.abs().max() <= 16 ** -0.5
    assert not torch.equal(w1, layer.weights[1]["w1"])  # one stream, not one seed per branch
    assert layer.weights[0]["w2"].abs().max() == 0 and layer.weights[0]["b2"].abs().max() == 0


def test_insertion_switches_each_branch_in_after_its_epoch():
    model = nn.Sequential(nn.Linear(8, 8))
    (layer,) = install(model, [Branch("0", 0, 4, "residual_mlp", insert_epoch=2),
                               Branch("0", 4, 8, "linear", insert_epoch=0)], seed=0)
    assert model[0] is layer
    schedule = InsertionSchedule([layer])
    assert layer.active == [False, True]  # epoch 0: only the one inserted from the start
    schedule.end_epoch(0.0)
    assert layer.active == [False, True]  # epoch 1
    schedule.end_epoch(0.0)
    assert layer.active == [True, True]  # epoch 2: 2 epochs completed
    assert Branch("0", 0, 4, "residual_mlp", 9).from_start().insert_epoch == 0


def _health(epoch: int, stages: list[SeedStage], blueprints: list[int]) -> LayerHealthReport:
    return LayerHealthReport(layer_id="0", epoch=epoch, num_seeds=4, features=14,
                             stage=[stage_to_wire(s) for s in stages], blueprint_id=blueprints)


def test_the_grown_architecture_is_read_from_health_reports():
    reports = [
        _health(1, [S.DORMANT] * 4, [-1] * 4),
        _health(2, [S.GERMINATED, S.DORMANT, S.GERMINATED, S.DORMANT], [1, -1, 2, -1]),
        _health(3, [S.TRAINING, S.GERMINATED, S.CULLED, S.DORMANT], [1, 3, -1, -1]),
        _health(4, [S.GRAFTING, S.TRAINING, S.DORMANT, S.DORMANT], [1, 3, -1, -1]),
        _health(5, [S.FOSSILIZED, S.GRAFTING, S.GERMINATED, S.DORMANT], [1, 3, 1, -1]),
    ]
    # Chunks of 14 features in 4: 4, 4, 3, 3. Seed 2 germinated again at 5, still GERMINATED:
    # not blended in, so not part of the architecture.
    assert branches_from_health(reports) == [
        Branch("0", 0, 4, "residual_mlp", 2, "FOSSILIZED"),
        Branch("0", 4, 8, "linear", 3, "GRAFTING")]
    assert branches_from_health(reports[:2]) == []


def test_a_control_trains_its_branches_as_the_seeds_optimiser_does():
    p = DigitsParams(epochs=1, seed=0, seeded=False, lr=3e-3, seed_lr=1e-2, weight_decay=1.0)
    model = build_model(p)
    (layer,) = install(model, [Branch("0", 0, 16, "residual_mlp")], seed=0)
    captured = {}
    original = torch.optim.AdamW.__init__

    def spy(self, groups, *args, **kwargs):
        captured["groups"] = groups
        original(self, groups, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "__init__", spy)
        result = train_digits(p, model, None, load_digits_split())
    host_group, branch_group = captured["groups"]
    assert (host_group["lr"], host_group["weight_decay"]) == (3e-3, 1.0)
    assert (branch_group["lr"], branch_group["weight_decay"]) == (1e-2, 0.0)
    assert {id(q) for q in branch_group["params"]} == {id(q) for q in layer.branch_parameters()}
    assert result.params_host == sum(q.numel() for q in host_group["params"]) == 4470


def test_jobs_built_in_threads_at_once_get_their_serial_initialisation():
    """The runtime service trains each job in its own thread, and `make run` submits a random
    seed's seeded and host jobs together: their models, built at the same moment, must be the
    ones a lone build gives (torch's global generator is the process's, and nn.Linear draws
    from it), or the paired host/seeds comparison is not paired and no run repeats."""
    import sys
    import threading
    params = [DigitsParams(seed=s, seeded=seeded) for s in (0, 1) for seeded in (True, False)]
    want = [build_model(p).state_dict() for p in params]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for _ in range(5):
            got: dict[int, dict] = {}
            threads = [threading.Thread(target=lambda i=i, got=got: got.__setitem__(
                i, build_model(params[i]).state_dict())) for i in range(len(params))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, state in got.items():
                assert state.keys() == want[i].keys()
                for k, v in state.items():  # (bit for bit; NaN where nothing is measured yet)
                    torch.testing.assert_close(v, want[i][k], rtol=0, atol=0, equal_nan=True,
                                               msg=f"{params[i]} {k}")
    finally:
        sys.setswitchinterval(old)
