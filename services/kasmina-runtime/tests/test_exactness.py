"""Dormant and TRAINING seeds are invisible to the host: bit-identical outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from kasmina import SeedStage

DTYPES = [torch.float32, torch.bfloat16]


def run_and_grads(module, x, g):
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(g)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 12), (1, 12)])
def test_dormant_layer_is_the_host_bit_for_bit(make_layer, dtype, shape):
    layer = make_layer(dtype=dtype)
    layer.train()
    x = torch.randn(shape, dtype=dtype)
    g = torch.randn(*shape[:-1], 23, dtype=dtype)
    host = copy.deepcopy(layer.host)
    out = run_and_grads(layer, x, g)
    ref = run_and_grads(host, x, g)
    assert out.dtype == dtype and torch.equal(out, ref)
    assert torch.equal(layer.host.weight.grad, host.weight.grad)
    assert torch.equal(layer.host.bias.grad, host.bias.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_blending_neighbour", [False, True])
def test_training_seed_leaves_output_and_host_gradients_exact(make_layer, drive, dtype,
                                                             with_blending_neighbour):
    layer = make_layer(dtype=dtype, isolate_host_in_blend=True)
    drive(layer, 1, SeedStage.TRAINING)
    drive(layer, 4, SeedStage.TRAINING, blueprint="linear")
    if with_blending_neighbour:
        drive(layer, 2, SeedStage.GRAFTING)
        layer.alpha[2] = 0.5
    x = torch.randn(9, 12, dtype=dtype)
    g = torch.randn(9, 23, dtype=dtype)
    host = copy.deepcopy(layer.host)
    out = run_and_grads(layer, x, g)
    ref = run_and_grads(host, x, g)
    trained = [c for s in (1, 4) for c in range(*layer.chunks[s])]
    untouched = [c for c in range(23) if c not in range(*layer.chunks[2])]
    assert torch.equal(out[:, trained], ref[:, trained])
    if not with_blending_neighbour:
        assert torch.equal(out, ref)
        assert torch.equal(layer.host.weight.grad, host.weight.grad)
        assert torch.equal(layer.host.bias.grad, host.bias.grad)
    else:  # rows of the host weight for features outside the blended chunk are exact
        assert torch.equal(layer.host.weight.grad[untouched], host.weight.grad[untouched])
        assert not torch.equal(out, ref)
    # the blueprints of training seeds did get a reconstruction gradient
    assert layer.banks["1"].named_grads["w1"].abs().sum() > 0
    assert layer.banks["3"].named_grads["w"].abs().sum() > 0


def test_blend_gives_the_host_exactly_its_one_minus_alpha_share(make_layer, drive):
    layer = make_layer(isolate_host_in_blend=True, seeds=5)
    drive(layer, 0, SeedStage.GRAFTING)
    layer.alpha[0] = 0.25
    x = torch.randn(6, 12)
    h_probe = layer.host(x).detach().requires_grad_()  # stands in for the host's output
    layer.host.register_forward_hook(lambda m, i, o: h_probe)
    g = torch.randn(6, 23)
    out = layer(x)
    out.backward(g)
    s, e = layer.chunks[0]
    expected = g.clone()
    expected[:, s:e] *= 0.75
    assert torch.equal(h_probe.grad, expected)
    chunk = h_probe.detach()[:, s:e]
    bank = layer.banks["1"]  # the first bank: its slots are lanes 0..capacity-1
    bp = bank(chunk.unsqueeze(0).expand(bank.capacity, -1, -1))[int(layer.slot[0])]
    assert torch.allclose(out[:, s:e], 0.75 * chunk + 0.25 * bp, rtol=0, atol=1e-6)
    assert torch.equal(out[:, e:], h_probe.detach()[:, e:])


def test_rollback_restores_the_chunk_and_the_seed_exactly(make_layer, drive):
    layer = make_layer()
    x = torch.randn(5, 12)
    before_out = layer(x).detach()
    before_state = layer.state.clone()
    drive(layer, 3, SeedStage.GRAFTING)
    for _ in range(10):
        layer(x).sum().backward()
        layer.step()
    assert not torch.equal(layer(x), before_out)
    layer.transition(3, SeedStage.ROLLED_BACK)
    assert torch.equal(layer(x), before_out)
    assert layer.stage_of(3) is SeedStage.ROLLED_BACK
    expected = before_state.clone()
    expected[3, 0] = SeedStage.ROLLED_BACK
    assert torch.equal(layer.state, expected)
    assert layer.alpha[3] == 0 and layer.slot[3] == -1
    assert all(p.abs().sum() == 0 for p in layer.banks["1"].params.values())
