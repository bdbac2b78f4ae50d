"""The forward pass launches the same ops whatever num_seeds, and non-finite seeds never reach
the host."""

from __future__ import annotations

import math

import pytest
import torch
from kasmina import KasminaConfig, KasminaLayer, SeedStage
from torch import nn
from torch.profiler import ProfilerActivity, profile


def ops_per_step(num_seeds: int, active: int) -> list[str]:
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(32, 4096), num_seeds, KasminaConfig(max_active_seeds=8))
    for seed in range(active):
        layer.germinate(seed * (num_seeds // max(active, 1)), "residual_mlp")
        for stage in (SeedStage.TRAINING, SeedStage.GRAFTING):
            layer.transition(seed * (num_seeds // max(active, 1)), stage, force=True)
    x = torch.randn(16, 32)
    layer(x).sum().backward()  # warm-up
    layer.step(1.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x).sum().backward()
        layer.step(1.0)
    # Top-level aten ops only: how an op decomposes inside ATen may depend on shapes.
    return sorted(e.name for e in prof.events() if e.name.startswith("aten::") and not (
        e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events")  # newer torch
@pytest.mark.parametrize("active", [0, 3])
def test_op_count_does_not_grow_with_num_seeds(active):
    small, large = ops_per_step(8, active), ops_per_step(2048, active)
    assert small == large
    assert len(large) > 10  # the profiler really saw the step


def test_non_finite_seed_output_never_reaches_the_host(make_layer, drive):
    layer = make_layer()
    drive(layer, 1, SeedStage.GRAFTING)
    drive(layer, 2, SeedStage.GRAFTING)
    layer.alpha[1] = layer.alpha[2] = 0.5
    with torch.no_grad():
        layer.banks["1"].params["b2"][int(layer.slot[1])] = math.inf
    x = torch.randn(6, 12)
    out = layer(x)
    s, e = layer.chunks[1]
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, s:e], layer.host(x)[:, s:e])
    out.sum().backward()
    assert torch.isfinite(layer.host.weight.grad).all()
    layer.step()
    assert layer.stage_of(1) is SeedStage.GRAFTING  # rolled back at the boundary ...
    layer.end_epoch()
    assert layer.stage_of(1) is SeedStage.ROLLED_BACK  # ... with a recorded reason
    assert layer.stage_of(2) is SeedStage.GRAFTING
    (outcome,) = layer.drain_outcomes()
    assert "non-finite" in outcome.reason


def test_non_finite_gradient_is_not_applied_and_rolls_back(make_layer, drive):
    layer = make_layer()
    drive(layer, 0, SeedStage.FINE_TUNING)
    layer.alpha[0] = 1.0
    x = torch.randn(6, 12)
    layer(x).sum().backward()
    bank = layer.banks["1"]
    bank.named_grads["w2"][int(layer.slot[0])] = math.nan
    before = bank.params["w2"].detach().clone()
    layer.step()
    assert torch.equal(bank.params["w2"], before)
    layer.end_epoch()
    assert layer.stage_of(0) is SeedStage.ROLLED_BACK


def test_drift_and_grad_norm_limits_publish_rollback_readiness(make_layer, drive):
    layer = make_layer(rollback_grad_norm_limit=1e-9)
    drive(layer, 0, SeedStage.FINE_TUNING)
    layer.alpha[0] = 1.0
    layer(torch.randn(6, 12)).sum().backward()
    layer.step()
    layer.end_epoch()
    assert layer.readiness() == {0: SeedStage.ROLLED_BACK}
