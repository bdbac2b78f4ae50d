from __future__ import annotations

import kasmina
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kasmina import KasminaLayer, split_chunks
from torch import nn


@given(st.integers(1, 5000).flatmap(lambda f: st.tuples(st.just(f), st.integers(1, f))))
def test_chunks_cover_every_feature_with_remainder_first(fs):
    features, seeds = fs
    chunks = split_chunks(features, seeds)
    assert len(chunks) == seeds and chunks[0][0] == 0 and chunks[-1][1] == features
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    sizes = [e - s for s, e in chunks]
    base, extra = divmod(features, seeds)
    assert sizes == [base + 1] * extra + [base] * (seeds - extra)


@pytest.mark.parametrize("seeds", [0, 24, -1])
def test_invalid_seed_counts_are_refused(seeds):
    with pytest.raises(ValueError, match="num_seeds"):
        KasminaLayer(nn.Linear(4, 23), seeds)


def test_non_linear_host_is_refused():
    with pytest.raises(TypeError):
        KasminaLayer(nn.Conv1d(1, 1, 1), 1)


def test_buffers_are_registered_with_documented_shapes():
    layer = KasminaLayer(nn.Linear(8, 31), 7)
    buffers = dict(layer.named_buffers())
    assert buffers["state"].dtype == torch.int32 and buffers["state"].shape == (7, 4)
    assert buffers["alpha"].dtype == torch.float32 and buffers["alpha"].shape == (7,)
    assert (buffers["state"][:, 1] == -1).all() and (buffers["state"][:, 3] == -1).all()
    assert buffers["telemetry.columns"].shape == (3, 31)  # per feature: sum, squares, dead
    assert buffers["telemetry.corr_prod"].shape[0] == 7
    assert {"state", "alpha", "telemetry.columns"} <= set(layer.state_dict())


def test_chunk_size_one_and_thousands_of_seeds_work():
    layer = KasminaLayer(nn.Linear(16, 3000), 3000)
    assert layer.chunks[5] == (5, 6)
    layer.germinate(7, "residual_mlp")
    layer.transition(7, kasmina.SeedStage.TRAINING)
    x = torch.randn(4, 16)
    out = layer(x)
    assert out.shape == (4, 3000)
    out.sum().backward()
    layer.step()
    report = layer.end_epoch()
    assert report.num_seeds == 3000 and report.stage[7] == kasmina.SeedStage.TRAINING


def test_wrap_replaces_in_place_with_module_paths_as_ids():
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(),
                          nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 2)))
    same = kasmina.wrap(model, seeds_per_layer=4, exclude=("2.1",))
    assert same is model
    layers = kasmina.seed_layers(model)
    assert [layer.layer_id for layer in layers] == ["0", "2.0"]
    assert isinstance(model[2][1], nn.Linear) and not isinstance(model[2][1], KasminaLayer)
    assert [layer.num_seeds for layer in layers] == [4, 4]
    kasmina.wrap(model, seeds_per_layer=4)  # idempotent on existing seed layers
    assert [layer.layer_id for layer in kasmina.seed_layers(model)] == ["0", "2.0", "2.1"]
    assert kasmina.seed_layers(model)[2].num_seeds == 2  # clamped to out_features
    single = kasmina.wrap(nn.Linear(3, 5), seeds_per_layer=2)
    assert isinstance(single, KasminaLayer)


def test_host_parameters_excludes_blueprints():
    model = kasmina.wrap(nn.Sequential(nn.Linear(4, 8)), seeds_per_layer=2)
    layer = kasmina.seed_layers(model)[0]
    layer.germinate(0, "residual_mlp")
    host = kasmina.host_parameters(model)
    assert {id(p) for p in host} == {id(layer.host.weight), id(layer.host.bias)}
    assert len(list(model.parameters())) > len(host)  # blueprints are registered parameters
