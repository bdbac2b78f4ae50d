"""`python -m kasmina migrate`: a checkpoint of legacy seed layers becomes one of DualPathLayers
on the chunked path, and the model's outputs stay exactly the original's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from kasmina import DualPathLayer, KasminaConfig, KasminaLayer, SeedStage, seed_layers, wrap
from kasmina.__main__ import main as kasmina_main
from kasmina.migrate import legacy_prefixes
from torch import nn

S = SeedStage
LEGACY = KasminaConfig(execution_path="legacy", ramp_steps=3)


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        kasmina_main(["migrate", *map(str, argv)])
    return exit_.value.code


def grow_to_fossilized(model: nn.Module, layer: KasminaLayer, x: torch.Tensor) -> None:
    layer.germinate(0)
    layer.transition(0, S.GRAFTING)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "banks" not in n], lr=0.01)
    for _ in range(LEGACY.ramp_steps):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.step(loss.detach())
    layer.end_epoch(None)
    layer.transition(0, S.FOSSILIZED)
    assert layer.params_added() > 0


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                         nn.Linear(10, 4))


def legacy_mlp() -> tuple[nn.Sequential, torch.Tensor]:
    """A model as a migrating team has it: plain legacy layers, one FOSSILIZED, one DORMANT."""
    torch.manual_seed(0)
    model = mlp()
    model[0] = KasminaLayer(model[0], 1, LEGACY, "0")
    model[2] = KasminaLayer(model[2], 1, LEGACY, "2")
    x = torch.randn(16, 6)
    grow_to_fossilized(model, model[0], x)
    return model.eval(), x


def block(d: int = 16) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(d, 2, dim_feedforward=24, dropout=0.0, batch_first=True)


def test_a_migrated_mlp_loads_into_the_wrapped_model_with_the_same_outputs(tmp_path):
    model, x = legacy_mlp()
    want = model(x)
    src, out = tmp_path / "legacy.pt", tmp_path / "chunked.pt"
    torch.save({"epoch": 1, "model": model.state_dict(), "optimizer": {"state": {}},
                "job_id": "j"}, src)
    assert run(src, "--out", out, "--seeds-per-layer", 4) == 0

    migrated = torch.load(out, weights_only=True)
    assert migrated["epoch"] == 1 and migrated["job_id"] == "j"  # the rest kept as it was
    target = wrap(mlp(), seeds_per_layer=4, config=KasminaConfig(execution_path="legacy"),
                  exclude=("4",))
    target.load_state_dict(migrated["model"])
    target.eval()
    layers = seed_layers(target)
    assert [type(layer) for layer in layers] == [DualPathLayer, DualPathLayer]
    assert [layer.execution_path for layer in layers] == ["chunked", "chunked"]
    assert [layer.legacy.stage_of(0) for layer in layers] == [S.FOSSILIZED, S.DORMANT]
    assert [layer.num_seeds for layer in layers] == [4, 4]
    assert set(layers[0].chunked.stage_counts) == {"DORMANT"}
    assert layers[0].epoch == model[0].epoch == 1  # the chunked path follows the job's epoch
    assert torch.equal(target(x), want)
    for layer in layers:  # a rollback to the legacy path: the same function again
        layer.request_path("legacy")
    assert torch.equal(target(x), want)
    assert layers[0].stage_of(0) is S.FOSSILIZED


def test_a_migrated_transformer_block_has_the_same_outputs(tmp_path):
    torch.manual_seed(1)
    model = block()
    model.linear1 = KasminaLayer(model.linear1, 1, LEGACY, "linear1")
    model.linear2 = KasminaLayer(model.linear2, 1, LEGACY, "linear2")
    x = torch.randn(3, 5, 16)
    grow_to_fossilized(model, model.linear2, x)
    model.eval()
    want = model(x)
    src, out = tmp_path / "block.pt", tmp_path / "migrated.pt"
    torch.save(model.state_dict(), src)  # a bare state_dict
    assert run(src, "--out", out) == 0

    target = block()
    target.linear1 = DualPathLayer(target.linear1, 8, KasminaConfig(execution_path="legacy"))
    target.linear2 = DualPathLayer(target.linear2, 8, KasminaConfig(execution_path="legacy"))
    target.load_state_dict(torch.load(out, weights_only=True))
    target.eval()
    assert target.linear2.legacy.stage_of(0) is S.FOSSILIZED
    assert target.linear1.execution_path == "chunked" and target.linear1.num_seeds == 8
    assert torch.equal(target(x), want)


def test_a_dry_run_prints_each_layer_and_writes_nothing(tmp_path, capsys):
    model, _ = legacy_mlp()
    src, out = tmp_path / "legacy.pt", tmp_path / "chunked.pt"
    torch.save(model.state_dict(), src)
    assert run(src, "--out", out, "--seeds-per-layer", 4, "--dry-run") == 0
    assert not out.exists()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("0: legacy KasminaLayer -> DualPathLayer on the chunked path; "
                               "seeds 1 -> 4; stages: legacy seed FOSSILIZED")
    assert lines[1].startswith("2: ") and "legacy seed DORMANT" in lines[1]
    target = wrap(mlp(), seeds_per_layer=4, config=KasminaConfig(execution_path="legacy"),
                  exclude=("4",))
    before = sum(p.numel() for n, p in model.named_parameters() if n.startswith("0."))
    after = sum(p.numel() for n, p in target.named_parameters() if n.startswith("0."))
    assert f"parameters {before:,} -> {after:,}" in lines[0], (lines[0], before, after)
    assert "nothing written" in lines[-1]


def test_a_growing_legacy_seed_stays_active_only_with_path_legacy(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(KasminaLayer(nn.Linear(4, 6), 1, LEGACY, "0"))
    model[0].germinate(0)
    model[0].transition(0, S.GRAFTING)
    x = torch.randn(5, 4)
    model[0].step()
    want = model(x)
    src, out = tmp_path / "g.pt", tmp_path / "m.pt"
    torch.save(model.state_dict(), src)
    assert run(src, "--out", out) == 2
    assert "the legacy seed is GRAFTING" in capsys.readouterr().err
    assert run(src, "--out", out, "--path", "legacy") == 0
    target = nn.Sequential(DualPathLayer(nn.Linear(4, 6), 6, LEGACY))
    target.load_state_dict(torch.load(out, weights_only=True))
    assert target[0].execution_path == "legacy" and target[0].stage_of(0) is S.GRAFTING
    assert torch.equal(target(x), want)


def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys):
    text, plain, out = tmp_path / "notes.txt", tmp_path / "plain.pt", tmp_path / "out.pt"
    text.write_text("not a checkpoint\n")
    torch.save(mlp().state_dict(), plain)
    model, _ = legacy_mlp()
    good = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), good)
    out.write_bytes(b"")
    cases = [((text, "--out", tmp_path / "a.pt"), "not a checkpoint"),
             ((tmp_path / "missing.pt", "--out", tmp_path / "a.pt"), "no such file"),
             ((plain, "--out", tmp_path / "a.pt"), "no legacy seed layers"),
             ((good, "--out", out), "exists (--force overwrites it)"),
             ((good, "--out", tmp_path / "a.pt", "--seeds-per-layer", 0), ">= 1")]
    for argv, message in cases:
        assert run(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("kasmina migrate: error: ") and message in err, err
        assert err.count("\n") == 1, err
    assert not (tmp_path / "a.pt").exists()
    assert run(good, "--out", out, "--force") == 0


def test_only_legacy_layers_are_found():
    chunked_one = KasminaLayer(nn.Linear(4, 6), 1, KasminaConfig(), "c")
    chunked_one.germinate(0)
    chunked_one.transition(0, S.TRAINING)  # a stage the short lifecycle lacks: not legacy
    model = nn.Sequential(chunked_one, KasminaLayer(nn.Linear(6, 8), 4, KasminaConfig()),
                          KasminaLayer(nn.Linear(8, 8), 1, LEGACY),
                          DualPathLayer(nn.Linear(8, 8), 1, LEGACY))
    assert legacy_prefixes(model.state_dict()) == ["2."]
    assert legacy_prefixes(KasminaLayer(nn.Linear(3, 3), 1, LEGACY).state_dict()) == [""]


def test_a_table_that_names_its_lifecycle_is_taken_at_its_word():
    """Once SeedTable.to_dict writes "lifecycle", a dormant one-seed chunked layer (the same
    keys and stages as a legacy one) is told apart by it."""
    def named(layer: KasminaLayer) -> dict:
        state = layer.state_dict()
        extra = json.loads(bytes(state["_extra_state"].numpy().tobytes()))
        extra["lifecycle"] = layer.execution_path
        state["_extra_state"] = torch.frombuffer(bytearray(json.dumps(extra).encode()),
                                                 dtype=torch.uint8)
        return state
    assert legacy_prefixes(named(KasminaLayer(nn.Linear(3, 3), 1, KasminaConfig()))) == []
    assert legacy_prefixes(named(KasminaLayer(nn.Linear(3, 3), 1, LEGACY))) == [""]


def test_a_model_that_is_one_legacy_layer_migrates(tmp_path):
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(5, 7), 1, LEGACY)
    x = torch.randn(4, 5)
    grow_to_fossilized(layer, layer, x)
    src, out = tmp_path / "l.pt", tmp_path / "d.pt"
    torch.save({"state_dict": copy.deepcopy(layer.state_dict())}, src)
    assert run(src, "--out", out, "--seeds-per-layer", 3) == 0
    target = DualPathLayer(nn.Linear(5, 7), 3, LEGACY)
    target.load_state_dict(torch.load(out, weights_only=True)["state_dict"])
    assert torch.equal(target(x), layer(x))
