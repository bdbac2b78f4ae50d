"""`KasminaConfig.training_task_share`: a TRAINING seed's blueprint also gets the task loss's
gradient at share s (out = h + s * (y - y.detach()) on its chunk) while the layer's output and
the host's and the input's gradients stay bit for bit those of a run without it (DESIGN §3.2's
TRAINING invariants)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from kasmina import KasminaConfig, SeedStage

S = SeedStage
DTYPES = [torch.float32, torch.bfloat16]


def training_layer(make_layer, drive, share: float, dtype=torch.float32, blending=False):
    """Chunks of 5, 5, 5, 4, 4 features: seeds 1 (residual_mlp) and 4 (linear, a padded chunk)
    TRAINING; with `blending`, seed 2 GRAFTING at alpha 0.5 (the blend runs too)."""
    layer = make_layer(dtype=dtype, training_task_share=share)
    drive(layer, 1, S.TRAINING)
    drive(layer, 4, S.TRAINING, blueprint="linear")
    if blending:
        drive(layer, 2, S.GRAFTING)
        layer.alpha[2] = 0.5
    return layer.train()


def run(layer, x, g):
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = layer(xi)
    out.backward(g)
    return out, xi.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blending", [False, True])
def test_output_host_and_input_gradients_are_those_without_the_share(make_layer, drive, dtype,
                                                                     blending):
    base = training_layer(make_layer, drive, 0.0, dtype, blending)
    shared = copy.deepcopy(base)
    shared.config = shared.config.replace(training_task_share=0.25)
    x = torch.randn(9, 12, dtype=dtype)
    g = torch.randn(9, 23, dtype=dtype)
    out0, gx0 = run(base, x, g)
    out1, gx1 = run(shared, x, g)
    assert torch.equal(out1.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       out0.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert torch.equal(gx1, gx0)
    assert torch.equal(shared.host.weight.grad, base.host.weight.grad)
    assert torch.equal(shared.host.bias.grad, base.host.bias.grad)
    # the blueprints' do differ: they got the task gradient on top of the reconstruction's
    assert not torch.equal(shared.banks["1"].flat.grad, base.banks["1"].flat.grad)


def test_the_output_is_the_host_output_itself_negative_zeros_included(make_layer, drive):
    layer = training_layer(make_layer, drive, 1.0)
    x = torch.randn(6, 12)
    h = layer.host(x).detach()
    h[:, ::2] = -0.0  # h + 0.0 would turn these into +0.0
    h.requires_grad_()
    layer.host.register_forward_hook(lambda m, i, o: h)  # the host's output is h
    g = torch.randn(6, 23)
    out = layer(x)
    out.backward(g)
    assert torch.equal(out.detach().view(torch.int32), h.detach().view(torch.int32))
    assert torch.equal(h.grad, g)  # the host's output gets the whole of g, unscaled


def reference_bank_grads(layer, h: torch.Tensor, g: torch.Tensor, share: float
                         ) -> dict[str, tuple[list[int], torch.Tensor, torch.Tensor]]:
    """In float64, for each bank with TRAINING seeds: their slots, and the gradient on those
    slots of the sum over them of mse(bp(x), x) + share * <g, bp(x)> on each one's chunk (x =
    the chunk of h), and of <g, bp(x)> alone (J^T g). Straight from the definitions: chunks,
    slots, the bank's maths."""
    out = {}
    for key, bank in layer.banks.items():
        start, _ = layer.table.lanes[int(key)]
        flat = bank.flat.detach().double().requires_grad_()
        xs = torch.zeros(bank.capacity, h.shape[0], bank.chunk, dtype=torch.float64)
        mine = [(s, int(layer.slot[s]) - start) for s in layer.seeds_in(S.TRAINING)
                if start <= int(layer.slot[s]) < start + bank.capacity]
        if not mine:
            continue
        for seed, slot in mine:
            a, b = layer.chunks[seed]
            xs[slot, :, :b - a] = h[:, a:b].double()
        y = bank._forward(bank.view(flat), xs)
        recon = task = torch.zeros((), dtype=torch.float64)
        for seed, slot in mine:
            a, b = layer.chunks[seed]
            recon = recon + (y[slot, :, :b - a] - xs[slot, :, :b - a]).square().mean()
            task = task + (g[:, a:b].double() * y[slot, :, :b - a]).sum()
        full, = torch.autograd.grad(recon + share * task, flat, retain_graph=True)
        jtg, = torch.autograd.grad(task, flat)
        slots = [slot for _, slot in mine]
        out[key] = slots, full[slots], jtg[slots]
    return out


@pytest.mark.parametrize("share", [0.0, 0.05, 1.0])
def test_blueprint_gradient_is_reconstruction_plus_share_times_jtg(make_layer, drive, share):
    layer = training_layer(make_layer, drive, share, blending=True)
    base = copy.deepcopy(layer)
    base.config = base.config.replace(training_task_share=0.0)
    x, g = torch.randn(8, 12), torch.randn(8, 23)
    run(layer, x, g)
    run(base, x, g)
    ref = reference_bank_grads(layer, layer.host(x).detach(), g, share)
    assert sorted(ref) == ["1", "3"]  # residual_mlp's bank and linear's
    for key, (slots, full, jtg) in ref.items():
        got, recon_only = layer.banks[key].flat.grad[slots], base.banks[key].flat.grad[slots]
        torch.testing.assert_close(got.double(), full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((got - recon_only).double(), share * jtg, rtol=1e-4,
                                   atol=1e-6)
        assert jtg.abs().sum() > 0
    if share == 0.0:  # the option off is the lifecycle as it was: no shadow node at all
        assert torch.equal(layer.banks["1"].flat.grad, base.banks["1"].flat.grad)


def test_the_grafting_neighbour_and_the_host_are_untouched_by_the_share(make_layer, drive):
    """Only TRAINING lanes get the share: a GRAFTING seed's gradient is its alpha * J^T g."""
    layer = training_layer(make_layer, drive, 1.0, blending=True)
    base = copy.deepcopy(layer)
    base.config = base.config.replace(training_task_share=0.0)
    x, g = torch.randn(8, 12), torch.randn(8, 23)
    run(layer, x, g)
    run(base, x, g)
    slot = int(layer.slot[2])  # seed 2's slot in residual_mlp's bank (lanes 0..capacity-1)
    assert torch.equal(layer.banks["1"].flat.grad[slot], base.banks["1"].flat.grad[slot])


def test_training_with_the_share_still_tracks_the_reconstruction_gate(make_layer, drive):
    layer = training_layer(make_layer, drive, 0.25)
    before = layer.banks["1"].flat.detach().clone()
    for _ in range(3):
        layer(torch.randn(8, 12)).square().mean().backward()
        layer.step()
    lanes = torch.nonzero(layer.lane_train).flatten()
    assert torch.isfinite(layer.lane_recon[lanes]).all()
    assert not torch.equal(layer.banks["1"].flat.detach(), before)


def test_in_eval_or_without_grad_nothing_changes(make_layer, drive):
    layer = training_layer(make_layer, drive, 0.5)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.host(x))
    layer.eval()
    assert torch.equal(layer(x), layer.host(x))


def test_a_grad_scaler_is_refused_while_a_seed_trains(make_layer, drive):
    layer = training_layer(make_layer, drive, 0.25)
    layer(torch.randn(4, 12)).sum().backward()
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="training_task_share with a GradScaler"):
        layer.step(scaler=scaler)


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, math.inf])
def test_config_refuses_shares_outside_zero_one(value):
    with pytest.raises(ValueError, match="training_task_share must be"):
        KasminaConfig(training_task_share=value)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_config_takes_shares_in_zero_one(value):
    assert KasminaConfig(training_task_share=value).training_task_share == value
    assert KasminaConfig().training_task_share == 0.0


# Dynamo itself instantiates autograd.Function classes while tracing and warns about it.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method. is deprecated:DeprecationWarning")
def test_torch_compile_traces_the_share_and_gives_the_eager_gradients(make_layer, drive):
    layer = training_layer(make_layer, drive, 0.25, blending=True)
    compiled = copy.deepcopy(layer)
    x, g = torch.randn(8, 12), torch.randn(8, 23)
    explanation = torch._dynamo.explain(compiled)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out0, gx0 = run(layer, x, g)
    out1, gx1 = run(torch.compile(compiled, backend="aot_eager", fullgraph=True), x, g)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0)
    for key in ("1", "3"):
        torch.testing.assert_close(compiled.banks[key].flat.grad, layer.banks[key].flat.grad)
