from __future__ import annotations

import kasmina
import pytest
import torch
from kasmina import BlueprintSpec, KasminaConfig, SeedStage, catalog, get_blueprint
from kasmina.bank import BlueprintBank


def test_catalog_has_the_three_kinds_with_stable_ids():
    assert {(s.name, s.id) for s in catalog()} >= {("residual_mlp", 1), ("low_rank", 2),
                                                    ("linear", 3)}
    assert get_blueprint(2) is get_blueprint("low_rank")


@pytest.mark.parametrize("name,chunk,count", [("residual_mlp", 4, 4 * 16 + 16 + 16 * 4 + 4),
                                              ("low_rank", 9, 9 * 4 * 2), ("linear", 3, 12)])
def test_param_counts(name, chunk, count):
    assert get_blueprint(name).param_count(chunk) == count


def test_fits_bounds():
    assert not get_blueprint("low_rank").fits(4) and get_blueprint("low_rank").fits(5)
    assert get_blueprint("linear").fits(256) and not get_blueprint("linear").fits(257)
    assert get_blueprint("residual_mlp").fits(1)


def test_custom_spec_registers_and_conflicts_are_refused():
    spec = BlueprintSpec("wide_mlp_test", "residual_mlp", 501, hidden=64)
    assert get_blueprint(spec) is spec and get_blueprint(501) is spec
    with pytest.raises(ValueError):
        kasmina.register_blueprint(BlueprintSpec("wide_mlp_test", "linear", 501))
    with pytest.raises(ValueError):
        BlueprintSpec("bad", "no_kind", 600)


@pytest.mark.parametrize("name", ["residual_mlp", "low_rank", "linear"])
def test_batched_bank_equals_a_per_seed_loop(name):
    spec, chunk = get_blueprint(name), 7
    bank = BlueprintBank(spec, chunk, 5, torch.device("cpu"))
    for slot in range(5):
        bank.init_slot(slot, seed=slot)
    x = torch.randn(5, 11, chunk)
    y = bank(x)
    for i in range(5):
        p = {n: t[i] for n, t in bank.params.items()}
        xi = x[i]
        if name == "residual_mlp":
            ref = xi + torch.nn.functional.gelu(xi @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        elif name == "low_rank":
            ref = xi + xi @ p["a"] @ p["b"]
        else:
            ref = xi @ p["w"] + p["b"]
        torch.testing.assert_close(y[i], ref)


def test_masked_adam_matches_torch_adam_and_leaves_frozen_slots_alone():
    cfg = KasminaConfig(seed_lr=1e-2)
    bank = BlueprintBank(get_blueprint("linear"), 4, 4, torch.device("cpu"))
    for slot in range(3):
        bank.init_slot(slot, seed=slot)
    ref = bank.params["w"][0].detach().clone().requires_grad_()
    ref_b = bank.params["b"][0].detach().clone().requires_grad_()
    frozen = {n: p[1].detach().clone() for n, p in bank.params.items()}
    opt = torch.optim.Adam([ref, ref_b], lr=1e-2)
    trainable = torch.tensor([True, False, True, False])
    for _ in range(5):
        x = torch.randn(4, 6, 4)
        bank(x)[:2].sum().backward()  # slots 2 and 3 are outside the loss
        (x[0] @ ref + ref_b).sum().backward()
        bank.seed_step(trainable, cfg)
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(bank.params["w"][0], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bank.params["b"][0], ref_b, rtol=1e-5, atol=1e-6)
    for n, p in bank.params.items():
        assert torch.equal(p[1], frozen[n])
    # slot 2 is trainable but unused: its zero gradient leaves its moments and weights at rest
    assert bank.opt_step.tolist() == [5, 0, 5, 0]
    assert bank.exp_avg[2].abs().sum() == 0


def test_stabilization_freezes_the_blueprint(make_layer, drive):
    layer = make_layer()
    drive(layer, 0, SeedStage.STABILIZATION)
    layer.alpha[0] = 1.0  # forced past GRAFTING: give the blend a gradient path
    before = {n: p.detach().clone() for n, p in layer.banks["1"].params.items()}
    x = torch.randn(8, 12)
    for _ in range(3):
        layer(x).pow(2).sum().backward()
        layer.step()
    for n, p in layer.banks["1"].params.items():
        assert torch.equal(p, before[n])
    layer.transition(0, SeedStage.EVALUATING, force=True)
    layer.transition(0, SeedStage.FINE_TUNING, force=True)
    layer(x).pow(2).sum().backward()
    layer.step()
    assert not torch.equal(layer.banks["1"].params["w1"], before["w1"])


def test_training_learns_to_reconstruct_and_passes_the_gate(make_layer, drive):
    layer = make_layer(min_training_steps=20, seed_lr=1e-2)
    drive(layer, 1, SeedStage.TRAINING)
    x = torch.randn(64, 12)
    for _ in range(60):
        layer(x).sum().backward()
        layer.step()
    report = layer.end_epoch()
    assert report.reconstruction_ratio[1] <= 0.05
    assert layer.readiness() == {1: SeedStage.GRAFTING}
    layer.transition(1, SeedStage.GRAFTING)


def test_banks_are_fixed_and_a_full_bank_refuses_germination(make_layer, drive):
    layer = make_layer(in_f=4, out_f=64, seeds=64, max_active_seeds=64, bank_slots=8)
    params = [p.data_ptr() for p in layer.parameters()]
    for seed in range(8):
        drive(layer, seed, SeedStage.FOSSILIZED)
    assert sorted(layer.table.slot[:8].tolist()) == list(range(8))  # residual_mlp's lanes
    with pytest.raises(kasmina.CapacityError, match="bank_slots"):
        layer.germinate(8, "residual_mlp")
    assert layer.stage_of(8) is SeedStage.DORMANT
    layer.germinate(8, "linear")  # another blueprint's bank has room
    assert [p.data_ptr() for p in layer.parameters()] == params  # the same tensors throughout
    out = layer(torch.randn(3, 4))
    assert out.shape == (3, 64)
