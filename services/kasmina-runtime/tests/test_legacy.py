"""The legacy execution path (one seed over the whole layer, the short lifecycle) and the
`DualPathLayer` that switches a layer between it and the chunked path (DESIGN §9)."""

from __future__ import annotations

import copy

import pytest
import torch
from kasmina import DualPathLayer, KasminaConfig, KasminaLayer, LocalController, SeedStage
from kasmina.lifecycle import LifecycleError
from torch import nn

S = SeedStage
LEGACY = KasminaConfig(execution_path="legacy", ramp_steps=4)
# DESIGN §9: the stages the plan did not add, and one terminal failure.
SHORT_LIFECYCLE = {(S.DORMANT, S.GERMINATED), (S.GERMINATED, S.GRAFTING),
                   (S.GERMINATED, S.CULLED), (S.GRAFTING, S.FOSSILIZED), (S.GRAFTING, S.CULLED)}


def train(layer: nn.Module, steps: int, x: torch.Tensor, lr: float = 0.05) -> list[torch.Tensor]:
    """SGD on the host (the layer's `step` trains the seeds); the outputs of every step."""
    opt = torch.optim.SGD(layer.host.parameters(), lr=lr)
    outs = []
    for _ in range(steps):
        out = layer(x)
        loss = (out - 1.0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.step(loss.detach())
        outs.append(out.detach())
    return outs


def snapshot(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()
            if not k.endswith("_extra_state")}


def test_the_legacy_path_takes_exactly_the_short_lifecycle():
    for stage in S:
        for target in S:
            layer = KasminaLayer(nn.Linear(3, 5), 1, LEGACY)
            path = {S.DORMANT: [], S.GERMINATED: [S.GERMINATED], S.GRAFTING: [S.GERMINATED,
                    S.GRAFTING], S.FOSSILIZED: [S.GERMINATED, S.GRAFTING, S.FOSSILIZED],
                    S.CULLED: [S.GERMINATED, S.CULLED]}.get(stage)
            if path is None:
                continue  # not a stage of the short lifecycle: unreachable
            for step in path:
                if step is S.GERMINATED:
                    layer.germinate(0)
                else:
                    layer.transition(0, step, force=True)
            if target is S.GERMINATED and stage is S.DORMANT:
                layer.germinate(0)
                assert (stage, target) in SHORT_LIFECYCLE
            elif (stage, target) in SHORT_LIFECYCLE:
                layer.transition(0, target, force=True)
            else:
                with pytest.raises(LifecycleError):
                    if target is S.GERMINATED:
                        layer.germinate(0)
                    else:
                        layer.transition(0, target, force=True)
                assert layer.stage_of(0) is stage


def test_a_legacy_layer_has_one_seed_over_the_whole_layer():
    with pytest.raises(ValueError, match="one seed over the whole layer"):
        KasminaLayer(nn.Linear(3, 8), 2, LEGACY)
    layer = KasminaLayer(nn.Linear(3, 8), 1, LEGACY)
    assert layer.chunks == [(0, 8)] and layer.execution_path == "legacy"
    assert layer.promotion_stage is S.GRAFTING
    with pytest.raises(ValueError, match="execution_path"):
        KasminaConfig(execution_path="fast")


def test_the_local_controller_grows_a_legacy_seed_to_fossilized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(),
                          KasminaLayer(nn.Linear(6, 3), 1, LEGACY, "head"))
    controller = LocalController(model)
    x = torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(6):
        for _ in range(3):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            controller.step(loss.detach())
        controller.end_epoch(0.5)  # a plateau from the start: germinate, then promote
    moves = [(e.from_stage, e.to_stage) for e in controller.events]
    assert moves == [(S.DORMANT, S.GERMINATED), (S.GERMINATED, S.GRAFTING),
                     (S.GRAFTING, S.FOSSILIZED)], moves
    assert model[2].stage_of(0) is S.FOSSILIZED and model[2].params_added() > 0


def test_a_non_finite_legacy_seed_is_culled_for_good():
    layer = KasminaLayer(nn.Linear(3, 5), 1, LEGACY)
    layer.germinate(0)
    layer.transition(0, S.GRAFTING)
    with torch.no_grad():
        layer.banks["1"].flat.fill_(float("nan"))
    x = torch.randn(4, 3)
    out = layer(x)
    assert torch.equal(out, layer.host(x))  # a non-finite blueprint never reaches the output
    layer.step()
    layer.end_epoch(None)
    assert layer.stage_of(0) is S.CULLED
    for _ in range(12):  # no embargo to serve: CULLED is terminal in the short lifecycle
        layer.end_epoch(None)
    assert layer.stage_of(0) is S.CULLED
    assert torch.equal(layer(x), layer.host(x))


def test_one_chunked_seed_and_the_legacy_path_agree_on_the_same_commands():
    """The legacy commands (germinate, graft, fossilize) and their chunked translation
    (germinate, TRAINING, GRAFTING ... STABILIZATION with the gates skipped) give the same
    outputs at every step, the same blueprint and the same refusals."""
    torch.manual_seed(0)
    host = nn.Linear(5, 7)
    legacy = KasminaLayer(copy.deepcopy(host), 1, LEGACY, "l")
    chunked = KasminaLayer(copy.deepcopy(host), 1, KasminaConfig(ramp_steps=4), "l")
    x = torch.randn(9, 5)
    legacy.germinate(0)
    chunked.germinate(0)
    for layer in (legacy, chunked):
        with pytest.raises(LifecycleError):  # already growing
            layer.germinate(0)
    legacy.transition(0, S.GRAFTING)
    chunked.transition(0, S.TRAINING)
    chunked.transition(0, S.GRAFTING, force=True)
    for a, b in zip(train(legacy, 6, x), train(chunked, 6, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert legacy.alpha.item() == chunked.alpha.item() == 1.0
    legacy.end_epoch(None)
    chunked.end_epoch(None)
    assert legacy.readiness() == {0: S.FOSSILIZED} and chunked.readiness() == {
        0: S.STABILIZATION}  # alpha reached 1, in each path's terms
    legacy.transition(0, S.FOSSILIZED)
    chunked.transition(0, S.STABILIZATION)
    torch.testing.assert_close(legacy(x), chunked(x), rtol=0, atol=0)
    torch.testing.assert_close(legacy.banks["1"].flat, chunked.banks["1"].flat, rtol=0, atol=0)


def grown_dual(path: str = "legacy") -> tuple[DualPathLayer, torch.Tensor]:
    torch.manual_seed(0)
    layer = DualPathLayer(nn.Linear(4, 8), 4, KasminaConfig(execution_path=path, ramp_steps=3),
                          "d")
    return layer, torch.randn(10, 4)


def test_a_job_chooses_its_path_at_start_and_switches_at_a_boundary():
    layer, x = grown_dual()
    assert layer.execution_path == "legacy" and layer.num_seeds == 1
    layer.request_path("chunked")  # nothing stepped yet: at once
    assert layer.execution_path == "chunked" and layer.num_seeds == 4
    train(layer, 2, x)
    layer.request_path("legacy")  # mid-epoch: at the end of the next boundary
    assert layer.execution_path == "chunked" and layer.pending_path == "legacy"
    report = layer.end_epoch(0.7)
    assert len(report.stage) == 1  # the report of the path switched to, as it stands
    assert layer.health_report() is report and report.val_metric == 0.7
    assert layer.execution_path == "legacy" and layer.pending_path is None
    assert layer.epoch == 1  # the legacy path follows the job's epochs
    with pytest.raises(ValueError):
        layer.request_path("fast")


def test_switching_back_restores_the_legacy_path_bit_exactly():
    layer, x = grown_dual()
    layer.germinate(0)
    layer.transition(0, S.GRAFTING)
    train(layer, 4, x)
    layer.end_epoch(None)
    layer.transition(0, S.FOSSILIZED)
    train(layer, 2, x)
    layer.end_epoch(None)
    legacy_out = layer(x)
    before = snapshot(layer.legacy)

    layer.request_path("chunked")  # the legacy seed stays fossilized: part of the function
    assert torch.equal(layer(x), legacy_out)
    layer.germinate(1)
    layer.transition(1, S.TRAINING)
    layer.germinate(2)
    train(layer, 5, x)
    layer.request_path("legacy")  # a rollback: the chunked seeds' growth ends at the boundary
    layer.end_epoch(None)
    assert layer.execution_path == "legacy"
    assert layer.chunked.stage_of(1) is S.ROLLED_BACK
    assert layer.chunked.stage_of(2) is S.CANCELLED
    outcomes = layer.drain_outcomes()  # from both paths, each with its own chunk
    assert {(o.execution_path, o.seed_id, o.outcome, o.chunk_size) for o in outcomes} == {
        ("legacy", 0, S.FOSSILIZED, 8), ("chunked", 1, S.ROLLED_BACK, 2),
        ("chunked", 2, S.CANCELLED, 2)}
    after = snapshot(layer.legacy)
    changed = [k for k in before if not k.startswith("host.")
               and not torch.equal(before[k].nan_to_num(), after[k].nan_to_num())]
    assert changed == [], changed  # everything but the shared host, which trained on
    with torch.no_grad():  # the output: the host plus the legacy fossil, exactly
        want = layer.legacy.seed_forward(layer.host(x))
    assert torch.equal(layer(x), want)


def test_a_dual_path_layer_checkpoints_its_path_and_both_states():
    layer, x = grown_dual("chunked")
    layer.germinate(0)
    layer.transition(0, S.TRAINING)
    train(layer, 3, x)
    layer.request_path("legacy")
    state = copy.deepcopy(layer.state_dict())
    fresh = DualPathLayer(nn.Linear(4, 8), 4, KasminaConfig(ramp_steps=3), "d")
    fresh.load_state_dict(state)
    assert fresh.execution_path == "chunked" and fresh.pending_path == "legacy"
    assert fresh.stage_of(0) is S.TRAINING
    assert torch.equal(fresh(x), layer(x))
    fresh.end_epoch(None)
    assert fresh.execution_path == "legacy" and fresh.chunked.stage_of(0) is S.ROLLED_BACK


def test_the_controller_drives_a_dual_path_layer_on_its_active_path():
    torch.manual_seed(0)
    layer = DualPathLayer(nn.Linear(4, 6), 3, KasminaConfig(execution_path="legacy",
                                                            ramp_steps=3), "d")
    controller = LocalController(nn.Sequential(layer))
    x = torch.randn(8, 4)
    for _ in range(6):
        train(layer, 3, x)
        controller.end_epoch(0.5)
    assert layer.legacy.stage_of(0) is S.FOSSILIZED
    assert set(layer.chunked.stage_counts) == {"DORMANT"}
    with pytest.raises(LifecycleError):
        layer.germinate(1)  # the active path (legacy) has one seed; the chunked one has three


def test_a_growing_legacy_seed_holds_the_switch_until_it_has_finished():
    layer, x = grown_dual()
    layer.germinate(0)
    layer.transition(0, S.GRAFTING)
    train(layer, 2, x)
    layer.request_path("chunked")
    layer.end_epoch(None)
    assert layer.execution_path == "legacy" and layer.pending_path == "chunked"
    train(layer, 2, x)  # alpha reaches 1 (ramp_steps 3)
    layer.end_epoch(None)
    layer.transition(0, S.FOSSILIZED)
    train(layer, 1, x)
    layer.end_epoch(None)  # the seed has finished: the switch happens, the fossil stays
    assert layer.execution_path == "chunked" and layer.legacy.stage_of(0) is S.FOSSILIZED


def test_the_frozen_paths_fossil_gets_no_gradient_applied():
    layer, x = grown_dual()
    layer.germinate(0)
    layer.transition(0, S.GRAFTING)
    train(layer, 4, x)
    layer.end_epoch(None)
    layer.transition(0, S.FOSSILIZED)
    layer.request_path("chunked")
    train(layer, 1, x)  # a fossil keeps training on its own path (TRAINABLE_STAGES)...
    layer.end_epoch(None)
    assert layer.execution_path == "chunked"
    fossil = layer.legacy.banks["1"].flat.detach().clone()
    train(layer, 5, x)  # ...but frozen, the backward's gradient reaching it is dropped
    assert layer.legacy.banks["1"].flat.grad is None
    assert torch.equal(layer.legacy.banks["1"].flat, fossil)
    layer.request_path("legacy")
    layer.end_epoch(None)
    assert torch.equal(layer.legacy.banks["1"].flat, fossil)


def test_the_local_controller_decides_on_the_joining_path_after_a_switch():
    torch.manual_seed(0)
    layer = DualPathLayer(nn.Linear(4, 6), 3, KasminaConfig(ramp_steps=3), "d")
    controller = LocalController(nn.Sequential(layer))
    x = torch.randn(8, 4)
    layer.request_path("legacy")
    train(layer, 2, x)
    layer.request_path("chunked")  # at the next boundary, where a plateau also germinates
    for _ in range(6):
        controller.end_epoch(0.5)
        train(layer, 2, x)
    assert layer.execution_path == "chunked" and layer.seeds_in(S.TRAINING)
    assert [len(r.stage) for r in controller.reports] == [3]


def test_a_field_report_says_which_path_its_seed_grew_on():
    from kasmina.fleet.wire import outcome_to_field_report
    layer, x = grown_dual()
    layer.germinate(0)
    layer.transition(0, S.CULLED)
    (outcome,) = layer.drain_outcomes()
    report = outcome_to_field_report(outcome, "job-1", outcome.chunk_size, True, "acc")
    assert (report.execution_path, report.chunk_size) == ("legacy", 8)


def test_export_refuses_a_dual_path_layer_naming_it():
    import kasmina
    model = nn.Sequential(DualPathLayer(nn.Linear(4, 6), 3, KasminaConfig(), "d"))
    with pytest.raises(TypeError, match="DualPathLayer yet \\(0\\)"):
        kasmina.export(model)
