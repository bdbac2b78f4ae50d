from __future__ import annotations

import copy

import numpy as np
import torch
from kasmina import KasminaConfig, KasminaLayer, SeedStage
from torch import nn


def busy_layer(make_layer, drive):
    layer = make_layer(in_f=8, out_f=29, seeds=6, min_training_steps=1, max_active_seeds=6)
    drive(layer, 0, SeedStage.TRAINING)
    drive(layer, 1, SeedStage.GRAFTING, blueprint="low_rank", strategy="performance_linked")
    drive(layer, 2, SeedStage.FOSSILIZED, blueprint="linear")
    drive(layer, 3, SeedStage.TRAINING)
    layer.transition(3, SeedStage.CULLED)  # under embargo
    x = torch.randn(10, 8)
    for i in range(7):
        layer(x).pow(2).mean().backward()
        layer.step(1.0 / (i + 1))
    layer.end_epoch(val_metric=0.25)
    layer(x)  # fresh telemetry after the boundary
    return layer


def test_round_trip_into_a_fresh_layer_with_weights_only_load(make_layer, drive, tmp_path):
    layer = busy_layer(make_layer, drive)
    path = tmp_path / "ckpt.pt"
    torch.save(layer.state_dict(), path)
    fresh = KasminaLayer(nn.Linear(8, 29), 6, layer.config)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(5, 8)
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))
    loaded = fresh.state_dict()
    for k, v in layer.state_dict().items():
        if torch.is_tensor(v):  # bit-identical, NaN ("not measured") included
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert np.array_equal(fresh.table.state, layer.table.state)
    assert [fresh.stage_of(i) for i in range(6)] == [layer.stage_of(i) for i in range(6)]
    assert fresh.readiness() == layer.readiness() and fresh.epoch == layer.epoch
    assert torch.equal(fresh.banks["2"].exp_avg_sq, layer.banks["2"].exp_avg_sq)
    assert fresh.banks["2"].exp_avg_sq.abs().sum() > 0  # the seeds' Adam state came along
    assert torch.equal(fresh.get_extra_state(), layer.get_extra_state())


def test_training_continues_identically_after_loading(make_layer, drive):
    layer = busy_layer(make_layer, drive)
    fresh = KasminaLayer(nn.Linear(8, 29), 6, layer.config)
    fresh.load_state_dict(copy.deepcopy(layer.state_dict()))
    fresh.train()
    x = torch.randn(10, 8)
    for module in (layer, fresh):
        for _ in range(3):
            module(x).pow(2).mean().backward()
            module.host.zero_grad()
            module.step(0.5)
    assert torch.equal(layer.alpha, fresh.alpha)
    for key in layer.banks:
        for n, p in layer.banks[key].params.items():
            assert torch.equal(p, fresh.banks[key].params[n])
    assert layer.end_epoch(0.2).stage.tolist() == fresh.end_epoch(0.2).stage.tolist()


def test_dtype_casts_keep_float32_blueprints_and_float64_accumulators(make_layer, drive):
    layer = make_layer()
    drive(layer, 0, SeedStage.GRAFTING)
    layer.to(torch.bfloat16)
    assert layer.host.weight.dtype == torch.bfloat16
    assert layer.alpha.dtype == torch.float32 and layer.telemetry.columns.dtype == torch.float64
    assert layer.banks["1"].params["w1"].dtype == torch.float32
    out = layer(torch.randn(4, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert KasminaConfig() == layer.config


def test_a_whole_model_pickles_with_torch_save():
    """torch.save(model) (not only its state_dict) round-trips chunked and dual-path layers."""
    import io

    import kasmina
    from kasmina import DualPathLayer, KasminaConfig, KasminaLayer, SeedStage

    torch.manual_seed(0)
    model = nn.Sequential(KasminaLayer(nn.Linear(4, 8), 4), nn.ReLU(),
                          DualPathLayer(nn.Linear(8, 3), 3, KasminaConfig(execution_path="legacy")))
    kasmina.name_layers(model)
    model[0].germinate(1)
    model[0].transition(1, SeedStage.TRAINING)
    model[2].germinate(0)
    model[2].transition(0, SeedStage.GRAFTING)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), model(x))
    assert loaded[0].stage_of(1) is SeedStage.TRAINING and loaded[2].execution_path == "legacy"
