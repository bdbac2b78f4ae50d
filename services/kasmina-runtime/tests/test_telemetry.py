from __future__ import annotations

import numpy as np
import pytest
import torch
from kasmina import KasminaConfig, KasminaLayer, SeedStage
from torch import nn


def feed(layer, batches):
    layer.train()
    outs = []
    for x in batches:
        outs.append(layer(x).detach())
        layer.step()
    return torch.cat(outs)


@pytest.mark.parametrize("out_f,seeds", [(23, 5), (7, 7), (40, 1), (31, 4)])
def test_variance_dead_ratio_and_correlation_match_references(out_f, seeds):
    host = nn.Linear(6, out_f)
    with torch.no_grad():
        host.weight[:, 0] = 0  # some structure in the correlations
        host.weight[0] = 0
        host.bias[0] = 0  # feature 0 is dead
    layer = KasminaLayer(host, seeds, KasminaConfig(correlation_features=64,
                                                    correlation_rows=1000))
    h = feed(layer, [torch.randn(50, 6) for _ in range(3)]).double()
    report = layer.end_epoch()
    for i, (s, e) in enumerate(layer.chunks):
        chunk = h[:, s:e]
        assert report.chunk_variance[i] == pytest.approx(
            torch.var(chunk, unbiased=False).item(), rel=1e-4, abs=1e-7)
        assert report.dead_ratio[i] == pytest.approx((chunk.abs() < 1e-6).double().mean().item())
        cols = [c for c in range(e - s) if chunk[:, c].std() > 0]
        if len(cols) < 2:
            assert report.mean_abs_correlation[i] == 0
            continue
        corr = np.corrcoef(chunk[:, cols].numpy(), rowvar=False)
        off = np.abs(corr[~np.eye(len(cols), dtype=bool)]).mean()
        assert report.mean_abs_correlation[i] == pytest.approx(off, rel=1e-4)
    assert report.dead_ratio[0] >= 1 / (layer.chunks[0][1] - layer.chunks[0][0]) - 1e-9


def test_correlation_is_sampled_but_real():
    host = nn.Linear(64, 64)
    with torch.no_grad():  # chunk 0: 32 copies of one feature; chunk 1: 32 independent inputs
        host.bias.zero_()
        host.weight[:32] = torch.randn(1, 64)
        host.weight[32:] = torch.eye(64)[:32]
    layer = KasminaLayer(host, 2, KasminaConfig(correlation_features=8, correlation_rows=32))
    feed(layer, [torch.randn(100, 64) for _ in range(4)])
    report = layer.end_epoch()
    assert report.mean_abs_correlation[0] == pytest.approx(1.0, abs=1e-5)
    assert report.mean_abs_correlation[1] < 0.25


def test_accumulators_reset_each_epoch_and_report_nan_when_unmeasured():
    layer = KasminaLayer(nn.Linear(4, 10), 2)
    layer.eval()
    layer(torch.randn(5, 4))  # eval mode accumulates nothing
    report = layer.end_epoch()
    assert np.isnan(report.chunk_variance).all()
    feed(layer, [torch.randn(5, 4)])
    assert not np.isnan(layer.end_epoch().chunk_variance).any()
    assert float(layer.telemetry.rows) == 0 and float(layer.telemetry.columns.abs().sum()) == 0


def test_telemetry_every_samples_steps():
    layer = KasminaLayer(nn.Linear(4, 10), 2, KasminaConfig(telemetry_every=3))
    feed(layer, [torch.randn(5, 4) for _ in range(7)])  # steps 0, 3, 6 accumulate
    assert float(layer.telemetry.rows) == 3 * 5


def test_health_report_is_typed_and_has_stage_metrics(make_layer, drive):
    layer = make_layer()
    layer.layer_id = "l0"
    drive(layer, 2, SeedStage.TRAINING)
    x = torch.randn(16, 12)
    for _ in range(5):
        layer(x).sum().backward()
        layer.step()
    report = layer.end_epoch(val_metric=0.5)
    assert layer.health_report() is report
    seed = report.seed(2)
    assert seed.stage is SeedStage.TRAINING and seed.blueprint_id == 1 and seed.strategy_id == 0
    assert seed.reconstruction_ratio > 0 and seed.grad_norm > 0
    assert np.isnan(report.reconstruction_ratio[0])
    assert report.stage_counts() == {"DORMANT": 4, "TRAINING": 1}
    assert report.epoch == 1 and report.step == 5 and report.layer_id == "l0"


def test_a_new_telemetry_cadence_holds_from_the_next_forward():
    """set_telemetry_every at a boundary: the next forward follows the new cadence (not the one
    step() decided before), and a DualPathLayer's inactive path never tracks."""
    from kasmina import DualPathLayer
    layer = KasminaLayer(nn.Linear(4, 8), 4, KasminaConfig(telemetry_every=3)).train()
    x = torch.randn(5, 4)
    for _ in range(4):  # steps 1..4: the next forward (step 4) is not a tracking one at 3
        layer(x)
        layer.step()
    rows = float(layer.telemetry.rows)
    layer.set_telemetry_every(2)  # step 4 % 2 == 0: this forward tracks
    layer(x)
    assert float(layer.telemetry.rows) == rows + 5 and layer.config.telemetry_every == 2
    dual = DualPathLayer(nn.Linear(4, 8), 4, KasminaConfig(execution_path="legacy")).train()
    dual.set_telemetry_every(1)
    assert dual.config.telemetry_every == 1 and dual.active._tracking_step
    assert not dual.frozen._tracking_step and dual.frozen.config.telemetry_every == 1
