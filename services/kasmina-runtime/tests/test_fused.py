"""kasmina.fused (a plain nn.Linear host and its growing seeds as one autograd node, the blend
in place) against the layer's general path: the same outputs, gradients, statistics and
lifecycle. On the CPU the kernels run under the Triton interpreter (tiny shapes)."""

from __future__ import annotations

import copy
import gc
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the kernels' @triton.jit decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kasmina import KasminaConfig, KasminaLayer, SeedStage, fused  # noqa: E402
from torch import nn  # noqa: E402

S = SeedStage
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_layer(features=19, seeds=5, bias=True, blueprint="residual_mlp", **cfg):
    """Seeds 1 and 3 GRAFTING at alpha 0.5 and 0.25, seed 4 TRAINING (ragged chunks: 4, 4, 4,
    4, 3 features)."""
    torch.manual_seed(0)
    config = KasminaConfig(**{"kernels": "triton", "blueprints": (blueprint,),
                              "max_active_seeds": 4, "cuda_graphs": False, **cfg})
    layer = KasminaLayer(nn.Linear(6, features, bias=bias), seeds, config).to(DEVICE)
    with layer.batch():
        for s, stages in ((1, (S.TRAINING, S.GRAFTING)), (3, (S.TRAINING, S.GRAFTING)),
                          (4, (S.TRAINING,))):
            layer.germinate(s, blueprint)
            for stage in stages:
                layer.transition(s, stage, force=True)
    layer.alpha[1], layer.alpha[3] = 0.5, 0.25
    return layer


def general(layer: KasminaLayer) -> KasminaLayer:
    """A copy that takes the general path: a forward hook on the host (one that does nothing)
    rules the fused node out."""
    other = copy.deepcopy(layer)
    other.host.register_forward_hook(lambda *_: None)
    return other


def grads(layer: KasminaLayer, x: torch.Tensor) -> dict:
    out = {"weight": layer.host.weight.grad, "x": x.grad,
           **{f"bank{k}": b.flat.grad for k, b in layer.banks.items()}}
    if layer.host.bias is not None:
        out["bias"] = layer.host.bias.grad
    return out


@pytest.fixture(params=["residual_mlp", 6])
def blueprint(request):
    """The catalog's residual_mlp (16 hidden units: the backward's groups of 4), or a spec of 6
    (groups of 3: the backward's group is the largest divisor of the width up to 4)."""
    if request.param == "residual_mlp":
        return request.param
    from kasmina import blueprints
    return blueprints.register_blueprint(blueprints.BlueprintSpec(
        name="t_fused_h6", kind="residual_mlp", id=990_006, hidden=request.param)).name


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(13,), (3, 5)])
@pytest.mark.parametrize("features", [19, 20])
def test_fused_node_matches_the_general_path(bias, shape, blueprint, features):
    """19 features: ragged chunks (the kernels' chunks unaligned); 20: five chunks of 4 (a
    row's chunk one vector access, `_align` 4)."""
    layer = make_layer(bias=bias, blueprint=blueprint, features=features)
    assert layer._align == (1 if features == 19 else 4)
    assert all(b.spec.hidden == (16 if blueprint == "residual_mlp" else 6)
               for b in layer.banks.values())
    ref = general(layer)
    assert fused.applies(layer, torch.zeros(1, 6, device=DEVICE))
    assert not fused.applies(ref, torch.zeros(1, 6, device=DEVICE))
    torch.manual_seed(1)
    x = torch.randn(*shape, 6, device=DEVICE)
    g = torch.randn(*shape, features, device=DEVICE)
    results = []
    for m in (layer, ref):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.backward(g)
        results.append((out.detach(), grads(m, xi)))
    (out, got), (want_out, want) = results
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    untouched = [*range(4), *range(8, 12), *range(16, features)]  # seeds 0, 2, TRAINING 4
    assert torch.equal(out[..., untouched], layer.host(x)[..., untouched].detach())
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(layer.lane_recon, ref.lane_recon, rtol=1e-4, atol=1e-6,
                               equal_nan=True)
    assert not layer.lane_recon[layer.lane_train].isnan().any()
    # float64 sums of float32 partials, added in another order (the general path's blend
    # kernel computes them; here the telemetry's own pass)
    torch.testing.assert_close(layer.telemetry.columns, ref.telemetry.columns, rtol=1e-6,
                               atol=1e-5)
    for m in (layer, ref):
        m.step(torch.zeros((), device=DEVICE))
    for key, bank in layer.banks.items():
        torch.testing.assert_close(bank.flat, ref.banks[key].flat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.alpha, ref.alpha)


def test_frozen_blueprints_still_give_the_host_its_blended_gradient():
    """The host's (1 - alpha) is applied in the node's backward whether or not the blueprints'
    own gradients are wanted."""
    layer = make_layer()
    ref = general(layer)
    for m in (layer, ref):
        m.banks.requires_grad_(False)
    x = torch.randn(9, 6, device=DEVICE)
    for m in (layer, ref):
        m(x).square().sum().backward()
    torch.testing.assert_close(layer.host.weight.grad, ref.host.weight.grad, rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(layer.host.bias.grad, ref.host.bias.grad, rtol=1e-4, atol=1e-5)


def test_without_gradients_and_in_eval_the_blend_is_the_same():
    layer = make_layer()
    ref = general(layer)
    x = torch.randn(9, 6, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_poisoned_seeds_never_reach_the_output_and_roll_back():
    layer = make_layer()
    with torch.no_grad():
        for bank in layer.banks.values():
            bank.flat.fill_(float("nan"))
    x = torch.randn(7, 6, device=DEVICE, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, layer.host(x))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.host.weight.grad).all()
    # the host's gradient is its own: nothing blended
    xr = x.detach().clone().requires_grad_()
    layer.host(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    layer.step(torch.zeros((), device=DEVICE))
    layer.end_epoch(None)
    assert layer.seeds_in(S.ROLLED_BACK) == [1, 3, 4], layer.stage_counts


@pytest.mark.parametrize("case", ["hook", "fossilized", "through", "torch kernels",
                                  "subclass", "training task share"])
def test_the_general_path_where_the_node_does_not_apply(case):
    if case == "through":
        layer = make_layer(isolate_host_in_blend=False)
    elif case == "training task share":  # seed 4 TRAINING: the node has no shadow gradient
        layer = make_layer(training_task_share=0.25)
    elif case == "torch kernels":
        layer = make_layer(kernels="torch")
    else:
        layer = make_layer()
    if case == "hook":
        layer.host.register_forward_pre_hook(lambda *_: None)
    if case == "fossilized":
        with layer.batch():
            for stage in (S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED):
                layer.transition(1, stage, force=True)
    if case == "subclass":
        class MyLinear(nn.Linear):
            pass
        layer.host.__class__ = MyLinear
    x = torch.randn(4, 6, device=DEVICE)
    assert not fused.applies(layer, x)
    assert layer(x).shape == (4, 19)


def test_a_training_task_share_keeps_the_node_once_no_seed_trains():
    layer = make_layer(training_task_share=0.25)
    layer.transition(4, S.CANCELLED)
    assert fused.applies(layer, torch.randn(4, 6, device=DEVICE))


def test_a_layer_with_nothing_running_does_not_take_the_node():
    layer = KasminaLayer(nn.Linear(6, 8), 2, KasminaConfig(kernels="triton")).to(DEVICE)
    assert not layer._flags.fused
    x = torch.randn(3, 6, device=DEVICE)
    assert torch.equal(layer(x), layer.host(x))


def test_a_transformers_conv1d_host_takes_the_node_and_matches():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    layer = make_layer()
    conv = Conv1D(19, 6).to(DEVICE)  # weight (in, out): the Linear's, transposed
    with torch.no_grad():
        conv.weight.copy_(layer.host.weight.T), conv.bias.copy_(layer.host.bias)
    layer.host = conv
    ref = general(layer)
    x = torch.randn(2, 7, 6, device=DEVICE)
    assert fused.applies(layer, x) and not fused.applies(ref, x)
    results = []
    for m in (layer, ref):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), grads(m, xi)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for key in results[0][1]:
        torch.testing.assert_close(results[0][1][key], results[1][1][key], rtol=1e-4,
                                   atol=1e-5, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast to bf16 on a CUDA device")
def test_under_autocast_float32_weights_get_float32_gradients_that_match():
    layer = make_layer()  # float32 parameters, bf16 compute: mixed precision as users run it
    ref = general(layer)
    x = torch.randn(64, 6, device=DEVICE)
    results = []
    for m in (layer, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(xi)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        got = grads(m, xi)
        assert got["weight"].dtype == torch.float32 and got["x"].dtype == torch.float32
        results.append((out.float(), got))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-2, atol=2e-2)
    for key in results[0][1]:
        torch.testing.assert_close(results[0][1][key], results[1][1][key], rtol=3e-2,
                                   atol=1e-3, msg=key)


def test_a_commit_between_forward_and_backward_is_an_error_not_a_wrong_gradient():
    layer = make_layer()
    out = layer(torch.randn(5, 6, device=DEVICE, requires_grad=True))
    layer.germinate(0, "residual_mlp")  # a command commits: the lane tensors are rewritten
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_wide_chunks_keep_the_general_path():
    layer = make_layer(features=40)  # 8 features a chunk: 2 * 8 * 16 + 16 + 8 parameters
    assert not layer._flags.fused and layer._flags.live
    assert layer(torch.randn(3, 6, device=DEVICE)).shape == (3, 40)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_small_transformer_trains_the_same_on_either_path(arch, monkeypatch):
    """Hugging Face GPT-2 (Conv1D hosts) and Llama (nn.Linear, 3-D inputs, no biases), every
    seed layer growing one seed: two SGD steps with layer.step on the fused node and on the
    general path give the same losses and parameters."""
    import kasmina
    import transformers
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40,
                                         n_positions=16, bos_token_id=0, eos_token_id=0)
        model_class = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, max_position_embeddings=16,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model_class = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    base = model_class(config).to(DEVICE)
    cfg = KasminaConfig(kernels="triton", blueprints=("residual_mlp",), max_active_seeds=1,
                        cuda_graphs=False)  # (the node itself, step after step)
    kasmina.wrap(base, seeds_per_layer=16, config=cfg, exclude=["lm_head"])  # <= 4 features
    layers = kasmina.seed_layers(base)
    assert layers
    for layer in layers:
        with layer.batch():
            layer.germinate(1, "residual_mlp")
            for stage in (S.TRAINING, S.GRAFTING):
                layer.transition(1, stage, force=True)
        layer.alpha[1] = 0.5
    assert all(fused.applies(layer, torch.zeros(1, layer.in_features, device=DEVICE))
               for layer in layers)  # the first run takes the node in every seed layer
    ids = torch.randint(0, 40, (2, 8), device=DEVICE)
    runs = []
    for path in ("fused", "general"):
        model = copy.deepcopy(base)
        if path == "general":
            monkeypatch.setattr(fused, "applies", lambda *_: False)
        opt = torch.optim.SGD([p for n, p in model.named_parameters() if ".banks." not in n],
                              lr=0.1)
        torch.manual_seed(1)  # GPT-2's dropout draws the same masks on both paths
        losses = []
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            for layer in kasmina.seed_layers(model):
                layer.step(loss.detach())
            losses.append(loss.item())
        runs.append((losses, model.state_dict()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    for key, value in runs[0][1].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, runs[1][1][key], rtol=1e-4, atol=1e-5,
                                       equal_nan=True, msg=key)


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank of test_two_ddp_ranks_stay_bit_identical_on_the_fused_node."""
    import kasmina
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layer = make_layer()
        net = nn.parallel.DistributedDataParallel(kasmina.prepare_ddp(layer))
        opt = torch.optim.SGD(layer.host.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(7)
        applied = []
        for _ in range(3):
            x = torch.randn(8, 6, generator=gen)[rank * 4:(rank + 1) * 4]
            applied.append(fused.applies(layer, x))
            loss = net(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            layer.step(loss.detach())
        layer.end_epoch(None)  # the boundary all-reduces what each rank measured on its rows
        torch.save((applied, layer.state_dict()), f"{out}.{rank}")
        dist.barrier()  # both ranks done: neither tears gloo down under the other
    finally:
        gc.collect()  # what reference cycles hold of gloo goes before the group (test_distributed)
        dist.destroy_process_group()


@pytest.mark.skipif(DEVICE != "cpu", reason="gloo ranks on the CPU, under the interpreter")
def test_two_ddp_ranks_stay_bit_identical_on_the_fused_node(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.start_processes(_ddp_rank, args=(2, port, out), nprocs=2, start_method="spawn")
    (applied0, a), (applied1, b) = (torch.load(f"{out}.{r}", weights_only=False)
                                    for r in range(2))
    assert applied0 == applied1 == [True] * 3
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key].nan_to_num(), b[key].nan_to_num()), key


@pytest.mark.parametrize("rows", [True, False])
def test_feature_mul_is_torch_mul_with_one_rounding(rows):
    """The node's scaling of W and dW by D: torch.mul's bits (a float32 product rounded once to
    bf16), into a new tensor or in place; tiles whose features are all unscaled (skipped in
    place) keep their values."""
    from kasmina.kernels import triton_mlp
    torch.manual_seed(1)
    src = torch.randn(37, 300, device=DEVICE).bfloat16()
    scale = torch.ones(37 if rows else 300, device=DEVICE)
    scale[3:7] = torch.rand(4, device=DEVICE)  # a running chunk's features: 1 - alpha
    side = scale[:, None] if rows else scale[None, :]
    want = torch.mul(src, side, out=torch.empty_like(src))

    def same(got):  # the interpreter's bf16 casts truncate: one unit in the last place there
        if DEVICE == "cuda":
            assert torch.equal(got, want)
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
        assert torch.equal(got[:3], src[:3]) if rows else torch.equal(got[:, :3], src[:, :3])

    same(triton_mlp.feature_mul(src, scale, rows))
    same(triton_mlp.feature_mul(src.t().contiguous().t(), scale, rows))
    inplace = src.clone()
    assert triton_mlp.feature_mul(inplace, scale, rows, out=inplace) is inplace
    same(inplace)
