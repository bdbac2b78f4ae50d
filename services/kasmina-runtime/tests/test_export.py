"""`kasmina.summary` and `kasmina.export`: the grown model as plain torch modules."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import kasmina
import pytest
import torch
from kasmina import KasminaLayer, SeedStage
from torch import fx, nn

S = SeedStage
# float32: a folded blueprint rounds once where the grown layer rounds after the host and
# after the blueprint; measured worst difference 5e-7 on these models (outputs of order 1).
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def fossilize(drive, layer: KasminaLayer, seed: int, blueprint: str) -> None:
    drive(layer, seed, S.FOSSILIZED, blueprint)
    layer.alpha[seed] = 1.0  # where the grafting ramp leaves it


def end_in(layer: KasminaLayer, seed: int, stage: SeedStage) -> None:
    """Germinate and train a seed, then cull or roll it back: its chunk is the host's again."""
    layer.germinate(seed, "residual_mlp")
    layer.transition(seed, S.TRAINING, force=True)
    layer.transition(seed, stage, force=True)


def train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """A few seed-optimizer steps, so no blueprint keeps its initial weights."""
    model.train()
    for _ in range(steps):
        model(x).square().mean().backward()
        for layer in kasmina.seed_layers(model):
            layer.step()
        model.zero_grad()
    model.eval()


@pytest.fixture(name="mlp")
def _mlp(drive) -> tuple[nn.Module, torch.Tensor]:
    model = kasmina.wrap(nn.Sequential(
        nn.Linear(12, 23), nn.GELU(),  # ragged: chunks of 6, 6, 6, 5
        nn.Linear(23, 20, bias=False), nn.GELU(),
        nn.Linear(20, 4), nn.Tanh(),  # chunk size 1: 4 seeds, 4 features
        nn.Linear(4, 3)), seeds_per_layer=4)
    first, second, third, last = kasmina.seed_layers(model)
    for seed, blueprint in enumerate(["residual_mlp", "low_rank", "linear"]):
        fossilize(drive, first, seed, blueprint)
    end_in(first, 3, S.CULLED)
    fossilize(drive, second, 0, "linear")
    fossilize(drive, second, 1, "low_rank")
    end_in(second, 2, S.ROLLED_BACK)
    fossilize(drive, third, 1, "residual_mlp")
    fossilize(drive, third, 3, "linear")
    end_in(last, 0, S.ROLLED_BACK)
    x = torch.randn(9, 12)
    train(model, x)
    return model, x


@pytest.fixture(name="encoder")
def _encoder(drive) -> tuple[nn.Module, torch.Tensor]:
    block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=30, dropout=0.0, batch_first=True)
    model = kasmina.wrap(nn.TransformerEncoder(block, 1, enable_nested_tensor=False),
                         seeds_per_layer=4)
    linear1, linear2 = model.layers[0].linear1, model.layers[0].linear2  # chunks 8,8,7,7 / 4s
    fossilize(drive, linear1, 0, "residual_mlp")
    fossilize(drive, linear1, 2, "low_rank")
    end_in(linear1, 3, S.CULLED)
    fossilize(drive, linear2, 1, "linear")
    fossilize(drive, linear2, 3, "linear")
    x = torch.randn(3, 5, 16)
    train(model, x)
    return model, x


def no_kasmina_modules(model: nn.Module) -> bool:
    return not any(type(m).__module__.startswith("kasmina") for m in model.modules())


def test_summary_counts_bank_capacity_and_parameters_in_use(mlp):
    model, _ = mlp
    s = kasmina.summary(model)
    assert [r.layer_id for r in s.layers] == ["0", "2", "4", "6"]
    assert [r.stages for r in s.layers] == [
        {"FOSSILIZED": 3, "CULLED": 1}, {"DORMANT": 1, "FOSSILIZED": 2, "ROLLED_BACK": 1},
        {"DORMANT": 2, "FOSSILIZED": 2}, {"DORMANT": 2, "ROLLED_BACK": 1}]
    assert [(r.host, r.in_features, r.out_features, r.num_seeds) for r in s.layers] == [
        ("Linear", 12, 23, 4), ("Linear", 23, 20, 4), ("Linear", 20, 4, 4), ("Linear", 4, 3, 3)]
    mlp16 = lambda w: w * 16 + 16 + 16 * w + w  # noqa: E731  residual_mlp, hidden 16
    low_rank4 = lambda w: 2 * 4 * w  # noqa: E731
    linear = lambda w: w * w + w  # noqa: E731
    assert [r.params_in_use for r in s.layers] == [
        mlp16(6) + low_rank4(6) + linear(6), linear(5) + low_rank4(5), mlp16(1) + linear(1), 0]
    assert [r.host_params for r in s.layers] == [12 * 23 + 23, 23 * 20, 20 * 4 + 4, 4 * 3 + 3]
    banks = [sum(p.numel() for p in layer.banks.parameters())
             for layer in kasmina.seed_layers(model)]
    assert [r.bank_params for r in s.layers] == banks
    assert s.bank_params == sum(banks) and s.params_in_use == sum(r.params_in_use for r in s.layers)
    assert s.total_parameters == sum(p.numel() for p in model.parameters())
    assert s.total_parameters == sum(r.host_params for r in s.layers) + sum(banks)
    text = str(s).splitlines()
    assert text[0].split()[:5] == ["layer", "host", "features", "seeds", "stages"]
    assert text[1].split() == ["0", "Linear", "12->23", "4", "FOSSILIZED", "3,", "CULLED", "1",
                               f"{s.layers[0].params_in_use:,}", f"{banks[0]:,}", "299"]
    assert text[-2].split() == ["total", "15", f"{s.params_in_use:,}", f"{s.bank_params:,}",
                                f"{sum(r.host_params for r in s.layers):,}"]
    assert text[-1].startswith(f"model.parameters(): {s.total_parameters:,} = ")


def test_export_computes_what_the_grown_model_computes(mlp):
    model, x = mlp
    hosts = [layer.host.weight.detach().clone() for layer in kasmina.seed_layers(model)]
    with torch.no_grad():
        want, want_3d = model(x), model(x.view(3, 3, 12))
    exported = kasmina.export(model)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), want, **TIGHT)
        torch.testing.assert_close(exported(x.view(3, 3, 12)), want_3d, **TIGHT)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # the grown model untouched
    for layer, weight in zip(kasmina.seed_layers(model), hosts, strict=True):
        assert torch.equal(layer.host.weight, weight)
    assert no_kasmina_modules(exported)
    # A residual_mlp stays as a small module per seed; linear and low_rank fold into the host.
    assert isinstance(exported[0], fx.GraphModule)
    assert [n for n, _ in exported[0].named_children()] == ["seed0"]
    assert [n for n, _ in exported[4].named_children()] == ["seed1"]
    assert exported[0].weight.shape == (23, 12) and exported[0].out_features == 23
    assert type(exported[2]) is nn.Linear  # only foldable seeds grew there
    assert exported[2].bias is not None  # the bias-free host gained the linear seed's bias
    # No seed blended in: the host as it was.
    assert type(exported[6]) is nn.Linear
    assert torch.equal(exported[6].weight, hosts[3])
    summed = sum(p.numel() for p in exported.parameters())
    assert summed == sum(r.host_params for r in kasmina.summary(model).layers) + 20 + (
        6 * 16 + 16 + 16 * 6 + 6) + (1 * 16 + 16 + 16 * 1 + 1)  # + gained bias + residual seeds


def test_encoder_export_matches_with_and_without_grad(encoder):
    """Without grad, TransformerEncoderLayer takes a fused path that reads `linear1.weight`:
    the exported residual module keeps it off, as the seed layer does."""
    model, x = encoder
    exported = kasmina.export(model)
    layer = exported.layers[0]
    assert isinstance(layer.linear1, fx.GraphModule) and type(layer.linear2) is nn.Linear
    assert no_kasmina_modules(exported)
    torch.testing.assert_close(exported(x), model(x), **TIGHT)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), **TIGHT)
    with torch.inference_mode():
        torch.testing.assert_close(exported(x), model(x), **TIGHT)


@pytest.mark.parametrize("grown", ["mlp", "encoder"])
def test_torch_export_traces_the_exported_model(grown, request):
    model, x = request.getfixturevalue(grown)
    program = torch.export.export(kasmina.export(model), (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), **TIGHT)
    assert not any("kasmina" in str(node.target) for node in program.graph.nodes)


def test_exported_model_loads_and_runs_without_kasmina(mlp, encoder, tmp_path):
    exported = [kasmina.export(model) for model, _ in (mlp, encoder)]
    with torch.no_grad():
        want = [m(x) for m, (_, x) in zip(exported, (mlp, encoder), strict=True)]
    torch.save(exported, tmp_path / "models.pt")
    torch.save([m.state_dict() for m in exported], tmp_path / "state.pt")
    torch.save(([mlp[1], encoder[1]], want), tmp_path / "io.pt")
    code = textwrap.dedent("""
        import sys
        sys.modules["kasmina"] = None  # any import of kasmina now fails
        import torch
        d = sys.argv[1]
        models = torch.load(f"{d}/models.pt", weights_only=False)
        inputs, want = torch.load(f"{d}/io.pt")
        for model, state in zip(models, torch.load(f"{d}/state.pt", weights_only=True)):
            model.load_state_dict(state)
        with torch.no_grad():
            for model, x, y in zip(models, inputs, want):
                # another process may use another thread count: matmuls sum in another order
                torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)
        loaded = [name for name in sys.modules if name.startswith("kasmina")]
        assert loaded == ["kasmina"] and sys.modules["kasmina"] is None, loaded
    """)
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr


def test_active_seeds_raise_unless_allowed(drive):
    model = kasmina.wrap(nn.Sequential(nn.Linear(12, 23)), seeds_per_layer=4)
    layer = model[0]
    fossilize(drive, layer, 0, "linear")
    drive(layer, 1, S.GRAFTING, "residual_mlp")
    drive(layer, 2, S.EVALUATING, "linear")
    drive(layer, 3, S.TRAINING, "residual_mlp")  # trains, never blended
    layer.alpha[1], layer.alpha[2] = 0.5, 0.25
    with pytest.raises(ValueError, match=r"layer '0': seeds \{1: 'GRAFTING', 2: 'EVALUATING', "
                                         r"3: 'TRAINING'\}.*allow_active=True"):
        kasmina.export(model)
    x = torch.randn(7, 12)
    train(model, x)
    snapshot = kasmina.export(model, allow_active=True)
    assert [n for n, _ in snapshot[0].named_children()] == ["seed1"]
    with torch.no_grad():
        torch.testing.assert_close(snapshot(x), model(x), **TIGHT)


def test_counterfactual_and_zero_alpha_seeds_export_as_the_host(drive):
    model = kasmina.wrap(nn.Sequential(nn.Linear(12, 23)), seeds_per_layer=4)
    layer = model[0]
    fossilize(drive, layer, 0, "residual_mlp")
    fossilize(drive, layer, 1, "linear")
    layer.alpha[1] = 0.0
    x = torch.randn(7, 12)
    train(model, x)
    with layer.counterfactual([0]), torch.no_grad():
        exported = kasmina.export(model)
        assert type(exported[0]) is nn.Linear
        assert torch.equal(exported[0].weight, layer.host.weight)
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=0)


def test_tied_host_weights_stay_tied_unless_folded(drive):
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6))
    model[1].weight = model[2].weight = model[0].weight
    kasmina.wrap(model, seeds_per_layer=2, target_modules=["1", "2"])  # by name: ties kept
    end_in(model[1], 0, S.CULLED)
    fossilize(drive, model[2], 0, "linear")
    exported = kasmina.export(model)
    assert exported[1].weight is exported[0].weight  # the tie, as in the grown model
    assert exported[2].weight is not exported[0].weight  # folded: its own weight
    assert torch.equal(exported[0].weight, model[0].weight)
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), **TIGHT)


def test_conv1d_host_folds_and_keeps_residual_seeds(drive):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D  # noqa: N806
    model = kasmina.wrap(nn.Sequential(Conv1D(14, 8), nn.GELU(), Conv1D(10, 14)),
                         seeds_per_layer=2)  # chunks of 7 and of 5
    fossilize(drive, model[0], 0, "low_rank")
    fossilize(drive, model[0], 1, "residual_mlp")
    fossilize(drive, model[2], 1, "linear")
    x = torch.randn(2, 3, 8)
    train(model, x)
    exported = kasmina.export(model)
    assert isinstance(exported[0], fx.GraphModule) and type(exported[2]) is Conv1D
    assert exported[0].weight.shape == (8, 14)  # Conv1D's (in, out), as the host's
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), **TIGHT)
    program = torch.export.export(exported, (x,))
    torch.testing.assert_close(program.module()(x), exported(x), rtol=0, atol=0)
