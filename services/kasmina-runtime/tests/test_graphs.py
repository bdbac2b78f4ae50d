"""`KasminaConfig.cuda_graphs`: a graphed layer trains exactly as the eager one (on CUDA), and
changes nothing where graphs do not apply (the CPU, deepcopy, pickle)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from kasmina import KasminaConfig, KasminaLayer, SeedStage
from torch import nn

S = SeedStage


def growing(device: str, graphs: bool | str, dtype: torch.dtype = torch.float32, seeds: int = 12,
            share: float = 0.0) -> KasminaLayer:
    """Seeds of 8 features (the general path), or of 4 with seeds=24 (kasmina.fused's node);
    `share`: KasminaConfig.training_task_share."""
    torch.manual_seed(0)
    cfg = KasminaConfig(max_active_seeds=8, cuda_graphs=graphs, ramp_steps=6,
                        training_task_share=share)
    layer = KasminaLayer(nn.Linear(64, 96), seeds, cfg)
    layer.germinate(1, "residual_mlp", "performance_linked")
    layer.germinate(4, "residual_mlp")
    layer.transition(1, S.TRAINING, force=True)
    layer.transition(4, S.TRAINING, force=True)
    layer.transition(4, S.GRAFTING, force=True)
    return layer.to(device, dtype).train()


def train(layer: KasminaLayer, steps: int, device: str, dtype: torch.dtype,
          every_epoch: int = 0) -> list[torch.Tensor]:
    """Forward, backward, SGD on the host, layer.step; a stage change half-way (a commit drops
    the graphs, the next steps capture new ones). Returns every output and the final state."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(layer.host.parameters(), lr=0.01)
    outs = []
    for i in range(steps):
        x = torch.randn(16, 64, generator=gen).to(device, dtype).requires_grad_()
        out = layer(x)
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        layer.step(loss.detach())
        outs += [out.detach().clone(), x.grad.clone()]
        if i == steps // 2:
            layer.transition(1, S.GRAFTING, force=True)
    outs += [layer.alpha.clone(), layer.host.weight.detach().clone(),
             *(b.flat.detach().clone() for b in layer.banks.values()),
             layer.lane_grad_norm.clone(), layer.telemetry.columns.clone()]
    return outs


def test_on_the_cpu_the_flag_changes_nothing():
    eager = train(growing("cpu", False), 8, "cpu", torch.float32)
    graphed = train(growing("cpu", True), 8, "cpu", torch.float32)
    for a, b in zip(eager, graphed, strict=True):
        assert torch.equal(a, b)


def test_graphs_are_not_copied():
    layer = growing("cpu", True)
    assert copy.deepcopy(layer)._graphs.passes == {}
    assert pickle.loads(pickle.dumps(layer))._graphs is not layer._graphs


def test_graphs_default_to_auto():
    """cuda_graphs is "auto" unless set; another value is refused; copies keep the setting."""
    assert KasminaConfig().cuda_graphs == "auto"
    with pytest.raises(ValueError, match="cuda_graphs"):
        KasminaConfig(cuda_graphs="on")
    layer = growing("cpu", "auto")
    assert layer._graphs.auto and copy.deepcopy(layer)._graphs.auto
    assert pickle.loads(pickle.dumps(layer))._graphs.auto
    layer.set_cuda_graphs(True)
    assert not layer._graphs.auto
    layer.set_cuda_graphs(False)
    assert layer._graphs is None and not layer.config.cuda_graphs


def test_moving_a_layer_drops_its_graphs():
    """A graph reads the addresses it was captured with: `.to()` (a device round trip moves
    the blueprints' weights) drops every graph, whatever the stages."""
    for grafting in (False, True):
        layer = KasminaLayer(nn.Linear(8, 8), 2, KasminaConfig(cuda_graphs=True))
        layer.germinate(0, "residual_mlp")
        layer.transition(0, S.TRAINING, force=True)
        if grafting:
            layer.transition(0, S.GRAFTING, force=True)
        layer._graphs.passes["kind"] = layer._graphs.steps[True] = object()
        layer.to("cpu")
        assert not layer._graphs.passes and not layer._graphs.steps


def same(eager: list[torch.Tensor], graphed: list[torch.Tensor]) -> None:
    """`train`'s results: bit-equal, but the telemetry's float64 atomics (any order)."""
    for a, b in zip(eager[:-1], graphed[:-1], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(eager[-1], graphed[-1], rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("seeds", [12, 24])
def test_auto_graphs_a_small_plain_linear_only(monkeypatch, seeds):
    """"auto" graphs a host that is a plain nn.Linear with a GEMM under AUTO_MACS, on either
    path: not a host with a forward hook (a graph would run it at capture only), not a larger
    GEMM."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kasmina import graphs
    eager = train(growing("cuda", False, seeds=seeds), 10, "cuda", torch.float32)
    small = growing("cuda", "auto", seeds=seeds)
    same(eager, train(small, 10, "cuda", torch.float32))
    assert small._graphs.passes and small._graphs.steps
    hooked = growing("cuda", "auto", seeds=seeds)
    calls = []
    hooked.host.register_forward_hook(lambda *_: calls.append(1))
    train(hooked, 10, "cuda", torch.float32)
    assert not hooked._graphs.passes and len(calls) == 10
    monkeypatch.setattr(graphs, "AUTO_MACS", 16 * 64 * 96)  # train's GEMM: not under it
    large = growing("cuda", "auto", seeds=seeds)
    same(eager, train(large, 10, "cuda", torch.float32))
    assert not large._graphs.passes


@pytest.mark.gpu
@pytest.mark.parametrize("seeds", [12, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_training_equals_eager_on_cuda(dtype, seeds):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    eager_layer, graphed_layer = (growing("cuda", g, dtype, seeds) for g in (False, True))
    assert eager_layer._flags.fused == (seeds == 24)  # the graphs capture either path
    eager = train(eager_layer, 10, "cuda", dtype)
    graphed = train(graphed_layer, 10, "cuda", dtype)
    assert graphed_layer._graphs.passes and graphed_layer._graphs.steps  # it did replay
    names = ["out/grad"] * 20 + ["alpha", "host"] + ["bank"] * len(eager_layer.banks) + [
        "grad_norm", "columns"]
    for name, a, b in zip(names, eager, graphed, strict=True):
        # the telemetry's float64 atomics may add in another order; all else is bit-equal
        if name == "columns":
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        else:
            assert torch.equal(a, b), name
    assert eager_layer.stage_of(1) == graphed_layer.stage_of(1) == S.GRAFTING


@pytest.mark.gpu
@pytest.mark.parametrize("seeds", [12, 24])
def test_a_training_task_share_is_graphed_as_it_runs_eagerly(seeds):
    """The shadow gradient is part of the eager forward the graphs capture (on the general
    path: the fused node declines a TRAINING seed with a share)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    eager_layer, graphed_layer = (growing("cuda", g, seeds=seeds, share=0.5) for g in
                                  (False, True))
    plain = growing("cuda", False, seeds=seeds)
    assert not eager_layer._flags.fused
    eager = train(eager_layer, 10, "cuda", torch.float32)
    graphed = train(graphed_layer, 10, "cuda", torch.float32)
    without = train(plain, 10, "cuda", torch.float32)
    assert graphed_layer._graphs.passes and graphed_layer._graphs.steps
    for i, (a, b) in enumerate(zip(eager[:20], graphed[:20], strict=True)):
        assert torch.equal(a, b), i
    for a, b in zip(eager[20:-1], graphed[20:-1], strict=True):
        assert torch.equal(a, b)
    if seeds == 12:  # (24 without the share takes the fused node: other roundings)
        # the first step's output and input gradient are those without the share
        assert torch.equal(eager[0], without[0]) and torch.equal(eager[1], without[1])
    assert not torch.equal(eager[22], without[22])  # residual_mlp's bank moved otherwise


@pytest.mark.gpu
def test_a_forward_inside_the_callers_capture_runs_eagerly():
    """A caller capturing its own CUDA graph around the layer: the layer captures none of its
    own in it (a nested capture fails) and the caller's graph replays the eager forward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layer = growing("cuda", True, seeds=24)
    x = torch.randn(16, 64, device="cuda")
    expected = layer(x).detach()  # eager: this kind is warm, the next would be captured
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert not layer._graphs.passes
    assert torch.equal(out.detach(), expected)


@pytest.mark.gpu
def test_a_second_forward_before_backward_runs_eagerly():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layer, ref = growing("cuda", True), growing("cuda", False)
    x = torch.randn(16, 64, device="cuda")
    for m in (layer, ref):
        for _ in range(3):  # warm-up, capture, replay
            m(x).sum().backward()
            m.step()
        a, b = m(x), m(2 * x)  # two forwards, then one backward of both
        (a.sum() + b.sum()).backward()
        m.step()
    assert torch.equal(layer(x), ref(x))
    for key in layer.banks:
        assert torch.equal(layer.banks[key].flat, ref.banks[key].flat), key
