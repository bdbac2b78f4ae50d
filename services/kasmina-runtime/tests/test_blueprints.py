"""Blueprint specs, their banks and their maths; the catalog read from the contracts' one
definition (kasmina/blueprint_catalog.json, generated from oona's blueprint_catalog.txtpb)."""

from __future__ import annotations

import kasmina
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kasmina import BlueprintSpec, KasminaConfig, SeedStage, catalog, get_blueprint
from kasmina import blueprints as bp
from kasmina.bank import BlueprintBank
from kasmina.blueprints import (
    BlueprintModule,
    build_module,
    from_wire,
    resolve_wire_spec,
    uses_fused_mlp,
)
from kasmina.lifecycle import LifecycleError
from oona import contracts as wire

W = wire.BlueprintKind


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


# ---------------------------------------------------------------- specs as data (issue #19)


def test_the_runtime_catalog_is_the_contracts_catalog():
    ours = {s.id: s for s in catalog()}
    for message in wire.catalog():
        spec = ours[message.blueprint_id]
        assert (spec.name, spec.hidden, spec.rank, spec.min_chunk, spec.max_chunk) == (
            message.name, message.hidden, message.rank, message.min_chunk_size,
            message.max_chunk_size)
        cost = message.parameter_cost
        for chunk in (1, 5, 64, 257):
            assert spec.param_count(chunk) == (cost.per_chunk_squared * chunk**2
                                               + cost.per_chunk * chunk + cost.constant)
        assert spec.to_wire() == message


# Specs the catalog does not hold, one per kind and option: their costs and shapes must agree too.
HAND_MADE = [
    wire.BlueprintSpec(name="h1", kind=W.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=901, hidden=3),
    wire.BlueprintSpec(name="h2", kind=W.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=902,
                       hidden=257, activation=wire.BlueprintActivation.BLUEPRINT_ACTIVATION_TANH,
                       init=wire.BlueprintInit.BLUEPRINT_INIT_ZERO_OUTPUT),
    wire.BlueprintSpec(name="h3", kind=W.BLUEPRINT_KIND_LOW_RANK, blueprint_id=903, rank=1),
    wire.BlueprintSpec(name="h4", kind=W.BLUEPRINT_KIND_LOW_RANK, blueprint_id=904, rank=64,
                       min_chunk_size=64),
    wire.BlueprintSpec(name="h5", kind=W.BLUEPRINT_KIND_LINEAR, blueprint_id=905,
                       max_chunk_size=7),
]


@pytest.mark.parametrize("message", wire.catalog() + HAND_MADE, ids=lambda m: m.name)
def test_the_runtime_and_the_contracts_derive_the_same_shapes_and_cost(message):
    spec, cost = from_wire(message), wire.parameter_cost(message)
    for chunk in (1, 2, 5, 64, 257, 4096):
        assert spec.shapes(chunk) == wire.parameter_shapes(message, chunk)
        assert spec.param_count(chunk) == (cost.per_chunk_squared * chunk**2
                                           + cost.per_chunk * chunk + cost.constant)
    assert spec.to_wire().parameter_cost == cost


@given(kind=st.sampled_from(sorted(bp.KINDS)), size=st.integers(1, 4096),
       chunk=st.integers(1, 10_000))
def test_any_spec_costs_the_same_in_the_runtime_and_the_contracts(kind, size, chunk):
    sizes = {s: size for s in bp.KINDS[kind].sizes}
    spec = BlueprintSpec(f"p_{kind}", kind, 960, **sizes)
    message = spec.to_wire()
    cost = message.parameter_cost
    assert spec.shapes(chunk) == wire.parameter_shapes(message, chunk)
    assert spec.param_count(chunk) == (cost.per_chunk_squared * chunk**2
                                       + cost.per_chunk * chunk + cost.constant)
    assert from_wire(message) == spec


def test_the_runtime_names_every_activation_and_init_the_contracts_define():
    assert set(bp.ACTIVATIONS) == {wire.activation_name(a)
                                   for a in wire.BlueprintActivation.values()}
    assert bp.DEFAULT_ACTIVATION == wire.activation_name(0)
    assert set(bp.INITS) == {wire.BlueprintInit.Name(v).removeprefix("BLUEPRINT_INIT_").lower()
                             for v in wire.BlueprintInit.values() if v}
    assert set(bp.KINDS) == {wire.kind_name(k) for k in wire.BlueprintKind.values() if k}


@pytest.mark.parametrize("fields,error", [
    ({"kind": "residual_mlp"}, LifecycleError),  # no hidden
    ({"kind": "linear", "rank": 2}, LifecycleError),
    ({"kind": "low_rank", "rank": -1}, LifecycleError),
    ({"kind": "linear", "activation": "relu"}, LifecycleError),
    ({"kind": "residual_mlp", "hidden": 4, "activation": "swish"}, LifecycleError),
    ({"kind": "residual_mlp", "hidden": 4, "init": "orthogonal"}, LifecycleError),
    ({"kind": "linear", "min_chunk": 8, "max_chunk": 4}, LifecycleError),
    ({"kind": "conv"}, kasmina.UnknownBlueprintError),
])
def test_a_spec_no_kind_can_build_is_refused_without_the_contracts(fields, error):
    with pytest.raises(error):
        BlueprintSpec("bad_t", id=950, **fields)


def test_a_spec_never_seen_builds_a_module_with_its_sizes_and_activation():
    message = wire.BlueprintSpec(name="wide_relu_t", kind=W.BLUEPRINT_KIND_RESIDUAL_MLP,
                                 blueprint_id=811, hidden=24,
                                 activation=wire.BlueprintActivation.BLUEPRINT_ACTIVATION_RELU)
    module = build_module(message, chunk=6, seed=3)
    p = {n: t.detach() for n, t in module.params.items()}
    assert p["w1"].shape == (6, 24) and p["w2"].shape == (24, 6)
    x = torch.randn(2, 5, 6)
    ref = x + torch.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    torch.testing.assert_close(module(x), ref)
    assert sum(t.numel() for t in p.values()) == from_wire(message).param_count(6)


@pytest.mark.parametrize("kind,size", [(W.BLUEPRINT_KIND_RESIDUAL_MLP, {"hidden": 8}),
                                       (W.BLUEPRINT_KIND_LOW_RANK, {"rank": 3})])
def test_zero_output_init_starts_a_residual_blueprint_as_the_identity(kind, size):
    message = wire.BlueprintSpec(name="z", kind=kind, blueprint_id=812, **size,
                                 init=wire.BlueprintInit.BLUEPRINT_INIT_ZERO_OUTPUT)
    module = build_module(message, chunk=7)
    x = torch.randn(4, 7)
    assert torch.equal(module(x), x)
    plain = build_module(wire.BlueprintSpec(name="z", kind=kind, blueprint_id=812, **size), 7)
    assert not torch.equal(plain(x), x)


def test_a_bank_slot_draws_what_the_module_of_the_same_seed_draws():
    spec = from_wire(wire.BlueprintSpec(name="r", kind=W.BLUEPRINT_KIND_LOW_RANK,
                                        blueprint_id=813, rank=3,
                                        init=wire.BlueprintInit.BLUEPRINT_INIT_ZERO_OUTPUT))
    bank = BlueprintBank(spec, 9, 2, torch.device("cpu"))
    bank.init_slot(1, seed=42)
    module = BlueprintModule(spec, 9, seed=42)
    for name, value in module.params.items():
        assert torch.equal(bank.params[name][1], value.detach())
    assert not bank.params["b"][1].any()  # the output parameter starts at 0


@pytest.mark.parametrize("message,error,code", [
    (wire.BlueprintSpec(name="k", kind=77, blueprint_id=820), kasmina.UnknownBlueprintError,
     "unknown_blueprint"),
    (wire.BlueprintSpec(name="k", kind=W.BLUEPRINT_KIND_UNSPECIFIED, blueprint_id=820),
     kasmina.UnknownBlueprintError, "unknown_blueprint"),
    (wire.BlueprintSpec(name="k", kind=W.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=820),
     LifecycleError, "invalid"),
    (wire.BlueprintSpec(name="k", kind=W.BLUEPRINT_KIND_LINEAR, blueprint_id=820, rank=2),
     LifecycleError, "invalid"),
    # id 1 is the built-in residual_mlp: a different spec under its id is refused
    (wire.BlueprintSpec(name="residual_mlp", kind=W.BLUEPRINT_KIND_RESIDUAL_MLP,
                        blueprint_id=1, hidden=99), LifecycleError, "invalid"),
])
def test_a_spec_that_cannot_be_built_is_refused_with_its_reason_code(message, error, code):
    with pytest.raises(error) as caught:
        resolve_wire_spec(message)
    assert caught.value.code == code


def test_a_spec_that_does_not_fit_the_chunk_is_refused_as_such():
    message = wire.BlueprintSpec(name="wide_only", kind=W.BLUEPRINT_KIND_LOW_RANK,
                                 blueprint_id=821, rank=2, min_chunk_size=16)
    with pytest.raises(kasmina.BlueprintDoesNotFitError) as caught:
        build_module(message, chunk=8)
    assert caught.value.code == "blueprint_does_not_fit"


def test_resolving_the_same_spec_twice_names_one_blueprint():
    message = wire.BlueprintSpec(name="proposed_t", kind=W.BLUEPRINT_KIND_RESIDUAL_MLP,
                                 blueprint_id=830, hidden=32, ramp_steps=12,
                                 seed_learning_rate=3e-3, description="from Karn")
    spec = resolve_wire_spec(message)
    assert resolve_wire_spec(message) == spec and get_blueprint(830) == spec
    assert (spec.ramp_steps, spec.seed_lr) == (12, 3e-3)


def test_a_layer_grows_a_spec_received_from_the_wire():
    spec = resolve_wire_spec(wire.BlueprintSpec(
        name="grown_t", kind=W.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=831, hidden=5))
    layer = kasmina.KasminaLayer(torch.nn.Linear(6, 8), 2, KasminaConfig(
        blueprints=("residual_mlp", "grown_t")))
    layer.germinate(1, spec)
    for stage in (SeedStage.TRAINING, SeedStage.GRAFTING):
        layer.transition(1, stage, force=True)
    assert int(layer.state[1, 1]) == 831
    assert layer.banks["831"].params["w1"].shape[1:] == (4, 5)
    layer.alpha[1] = 1.0
    x = torch.randn(3, 6)
    assert not torch.allclose(layer(x)[:, 4:], layer.host(x)[:, 4:])


@pytest.mark.parametrize("activation,chunk,hidden,fused", [
    ("", 8, 16, True), ("gelu", 16, 16, True), ("relu", 8, 16, False), ("", 32, 16, True),
    ("", 128, 16, False), ("", 16, 128, False)])
def test_the_fused_mlp_kernel_is_chosen_by_kind_and_activation(activation, chunk, hidden,
                                                                 fused):
    spec = BlueprintSpec("f", "residual_mlp", 840, hidden=hidden, activation=activation)
    assert uses_fused_mlp(spec, chunk) is fused
    assert not uses_fused_mlp(get_blueprint("low_rank"), 8)


def test_a_bank_runs_its_specs_activation():
    spec = from_wire(wire.BlueprintSpec(
        name="relu_bank_t", kind=W.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=850, hidden=6,
        activation=wire.BlueprintActivation.BLUEPRINT_ACTIVATION_RELU))
    bank = BlueprintBank(spec, 5, 2, torch.device("cpu"))
    bank.init_slot(0, seed=1)
    x = torch.randn(2, 7, 5)
    p = {n: t[0].detach() for n, t in bank.params.items()}
    torch.testing.assert_close(bank(x)[0], x[0] + torch.relu(x[0] @ p["w1"] + p["b1"]) @ p["w2"]
                               + p["b2"])
    assert not bank._fusable  # the fused kernel computes GELU


def test_a_germinate_carrying_a_spec_is_built_from_the_spec():
    from kasmina.fleet.wire import CommandTarget
    from oona.contracts import AckReason, Germinate, LifecycleCommand

    spec = wire.BlueprintSpec(name="fleet_t", kind=W.BLUEPRINT_KIND_LOW_RANK, blueprint_id=851,
                              rank=2, description="from Karn")
    resolve_wire_spec(spec)  # known when the layer is built: it has a bank
    layer = kasmina.KasminaLayer(torch.nn.Linear(6, 12), 2, KasminaConfig(
        blueprints=("residual_mlp", "fleet_t")), layer_id="fc")
    target = CommandTarget("job", [layer])

    def germinate(seed: int, blueprint: wire.BlueprintSpec):
        return target.apply(LifecycleCommand(command_id=f"c{seed}{blueprint.blueprint_id}",
                                             job_id="job", layer_id="fc", seed_index=seed,
                                             germinate=Germinate(blueprint_spec=blueprint)), 0, 0)

    ack = germinate(0, spec)
    assert ack.success and int(layer.state[0, 1]) == 851
    bad = wire.BlueprintSpec(name="fleet_bad", kind=W.BLUEPRINT_KIND_LOW_RANK, blueprint_id=852)
    assert germinate(1, bad).reason == AckReason.ACK_REASON_INVALID
    alien = wire.BlueprintSpec(name="fleet_alien", kind=42, blueprint_id=853)
    assert germinate(1, alien).reason == AckReason.ACK_REASON_UNKNOWN_BLUEPRINT


@pytest.mark.parametrize("rows", [4096, 1000, 97])  # split in 16, in 2, not split
@pytest.mark.parametrize("bias", [True, False])
def test_the_cuda_matmul_of_blueprints_has_bmms_gradients(rows, bias):
    # _RowsMatmul (the blueprints' matmul on CUDA, run here on the CPU) splits the weight
    # gradient's reduction over row blocks; its gradients are torch.baddbmm's. x is a
    # transposed layout, as the layer's gathered chunks are.
    g0 = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3, 5, generator=g0, dtype=torch.float64).transpose(0, 1)
    x.requires_grad_()
    w = torch.randn(3, 5, 4, generator=g0, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, generator=g0, dtype=torch.float64, requires_grad=True) if bias else None
    y = bp._RowsMatmul.apply(x, w, b)
    want = torch.baddbmm(b.unsqueeze(1), x, w) if bias else torch.bmm(x, w)
    assert torch.equal(y, want)
    g = torch.randn(y.shape, generator=g0, dtype=torch.float64)
    inputs = (x, w, b) if bias else (x, w)
    for got, ref in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(want, inputs, g),
                        strict=True):
        torch.testing.assert_close(got, ref)
    assert bp._row_splits(rows, 3) == {4096: 16, 1000: 2, 97: 1}[rows]


def test_the_cuda_matmul_of_blueprints_under_autocast_gives_gradients_in_the_inputs_dtypes():
    x = torch.randn(2, 512, 4, requires_grad=True)
    w = torch.randn(2, 4, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bp._RowsMatmul.apply(x, w, None)
        want = torch.bmm(x, w)
    assert y.dtype == want.dtype == torch.bfloat16 and torch.equal(y, want)
    gx, gw = torch.autograd.grad(y.float().square().sum(), (x, w))
    rx, rw = torch.autograd.grad(want.float().square().sum(), (x, w))
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gx, rx, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-2)
