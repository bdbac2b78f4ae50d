"""On a CUDA device: the training step causes no host synchronisation, and exactness holds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from kasmina import KasminaConfig, KasminaLayer, SeedStage
from torch import nn

pytestmark = pytest.mark.gpu


def busy_layer(dtype: torch.dtype, graphs: bool | str = "auto") -> KasminaLayer:
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(256, 1000), 37, KasminaConfig(max_active_seeds=8,
                                                                 cuda_graphs=graphs))
    for seed, stage in ((1, SeedStage.TRAINING), (5, SeedStage.GRAFTING),
                        (9, SeedStage.FINE_TUNING)):
        layer.germinate(seed, "residual_mlp", "performance_linked")
        for s in (SeedStage.TRAINING, SeedStage.GRAFTING, SeedStage.STABILIZATION,
                  SeedStage.EVALUATING, SeedStage.FINE_TUNING):
            layer.transition(seed, s, force=True)
            if s == stage:
                break
    return layer.to("cuda", dtype)


@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
@pytest.mark.parametrize("graphs", [False, "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_never_synchronises(dtype, graphs):
    """Eager, or graphed by "auto" once its graphs are captured (a capture synchronises: the
    second step's forward and backward, the third's seed step, after each commit)."""
    layer = busy_layer(dtype, graphs).train()
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    warm = 1 if graphs is False else 3  # the first: lazy CUDA initialisation
    for i in range(warm + 2):
        torch.cuda.set_sync_debug_mode("error" if i >= warm else "default")
        try:
            loss = layer(x).float().pow(2).mean()
            loss.backward()
            layer.step(loss.detach())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert bool(layer._graphs and layer._graphs.passes and layer._graphs.steps) == bool(graphs)
    report = layer.end_epoch(0.5)  # the epoch boundary may synchronise
    assert report.stage[5] == SeedStage.GRAFTING and report.alpha[5] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dormant_and_training_chunks_are_exact_on_cuda(dtype):
    layer = busy_layer(dtype).train()
    layer.transition(5, SeedStage.ROLLED_BACK)
    layer.transition(9, SeedStage.ROLLED_BACK)
    host = copy.deepcopy(layer.host)
    x = torch.randn(33, 256, device="cuda", dtype=dtype)
    g = torch.randn(33, 1000, device="cuda", dtype=dtype)
    out = layer(x)
    out.backward(g)
    ref = host(x)
    ref.backward(g)
    assert torch.equal(out, ref)
    assert torch.equal(layer.host.weight.grad, host.weight.grad)


def test_wide_chunks_blueprint_gradients_on_cuda_match_the_cpus():
    """64-feature chunks run on the batched GEMMs; on CUDA their weight gradients are split
    over row blocks (blueprints._RowsMatmul), on the CPU torch's bmm: the same gradients."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(256, 512), 8, KasminaConfig(max_active_seeds=3,
                                                               cuda_graphs=False))
    for seed, stage in ((1, SeedStage.TRAINING), (6, SeedStage.GRAFTING)):
        layer.germinate(seed, "residual_mlp", "fixed_ramp")
        layer.transition(seed, SeedStage.TRAINING, force=True)
        if stage is SeedStage.GRAFTING:
            layer.transition(seed, stage, force=True)
    for _ in range(5):  # alpha > 0 on the grafting seed
        layer.step(torch.zeros(()))
    gpu = copy.deepcopy(layer).to("cuda").train()
    x = torch.randn(4096, 256)
    g = torch.randn(4096, 512)
    grads = []
    for model, dev in ((layer.train(), "cpu"), (gpu, "cuda")):
        model(x.to(dev)).backward(g.to(dev))
        grads.append({n: p.grad.cpu() for n, p in model.named_parameters()
                      if p.grad is not None and not n.startswith("host.")})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5,
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_attention_model_wrapped_on_cuda_trains_as_on_the_reference_path(dtype):
    """A two-block nn.TransformerEncoder (its MLP Linears wrapped: 4-feature chunks on linear2,
    the fused seed node's case, 16-feature ones on linear1) on CUDA: all dormant, its output is
    the bare model's bit for bit; with seeds TRAINING and GRAFTING in every layer, 4 training
    steps on the default paths (Triton kernels, the fused node and the fused tiles, checked
    taken; CUDA graphs where "auto" takes them) give the outputs and host weights of the
    PyTorch kernels, eager, within the dtype's tolerance, and every seed layer's telemetry is
    finite."""
    import kasmina
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    bare = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
    x = torch.randn(4, 32, 256, device="cuda", dtype=dtype)
    reference = copy.deepcopy(bare).to("cuda", dtype).train()
    models = []
    for cfg in (KasminaConfig(max_active_seeds=6),
                KasminaConfig(max_active_seeds=6, kernels="torch", cuda_graphs=False)):
        model = kasmina.wrap(copy.deepcopy(bare), seeds_per_layer=64, config=cfg)
        model = model.to("cuda", dtype).train()
        assert len(kasmina.seed_layers(model)) == 4
        with torch.no_grad():
            assert torch.equal(model(x), reference(x))
        for layer in kasmina.seed_layers(model):
            for seed, stage in ((3, SeedStage.TRAINING), (17, SeedStage.GRAFTING),
                                (40, SeedStage.GRAFTING)):
                layer.germinate(seed, "residual_mlp", "fixed_ramp")
                layer.transition(seed, SeedStage.TRAINING, force=True)
                if stage is SeedStage.GRAFTING:
                    layer.transition(seed, stage, force=True)
        models.append(model)
    # the comparison is fast against reference: linear2's 4-feature chunks on the fused node,
    # linear1's 16-feature ones on the general path's fused tiles, Triton on; the reference none
    for model, fast_paths in zip(models, (True, False), strict=True):
        for layer in kasmina.seed_layers(model):
            narrow = layer.layer_id.endswith("linear2")
            assert layer._triton is fast_paths and layer._flags.fused is narrow, layer.layer_id
            running = [layer.banks[k] for k in layer._flags.banks]  # the banks with running seeds
            assert running and all(b._fusable and b._node is narrow for b in running)
    outs = [[], []]
    for _ in range(4):
        for model, seen in zip(models, outs, strict=True):
            opt = torch.optim.SGD(kasmina.host_parameters(model), lr=0.1)
            out = model(x)
            loss = out.float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            for layer in kasmina.seed_layers(model):
                layer.step(loss.detach())
            seen.append(out.detach().float())
    rtol, atol = (2e-2, 2e-2) if dtype is torch.bfloat16 else (1e-3, 1e-3)
    for step, (a, b) in enumerate(zip(*outs, strict=True)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"step {step}")
    assert not torch.equal(outs[0][0], outs[0][-1])  # it trained and the blend moved
    host = [dict(zip(("fast", "ref"), ps, strict=True)) for ps in zip(
        *(kasmina.host_parameters(m) for m in models), strict=True)]
    for pair in host:
        torch.testing.assert_close(pair["fast"].float(), pair["ref"].float(), rtol=rtol,
                                   atol=atol)
    for layer in kasmina.seed_layers(models[0]):
        report = layer.end_epoch(0.0)
        assert np.isfinite(report.chunk_variance).all(), layer.layer_id
