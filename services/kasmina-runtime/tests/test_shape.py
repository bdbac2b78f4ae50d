"""The layer's shape (DESIGN §3.1): a parameter set fixed at construction, a compiled model that
never recompiles over a lifecycle, tensors-only checkpoints, and the drop-in edge cases (AMP,
empty batches, the metric's direction, eval mode left on)."""

from __future__ import annotations

import copy
import functools
import warnings

import kasmina
import pytest
import torch
from kasmina import ControllerConfig, KasminaConfig, KasminaLayer, LocalController, SeedStage
from torch import nn

S = SeedStage


def structure(module: nn.Module) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(n, p.data_ptr(), tuple(p.shape)) for n, p in module.named_parameters()]


def train_step(model, x, opt=None, layer=None, scaler=None):
    out = model(x)
    loss = out.float().pow(2).mean()
    (scaler.scale(loss) if scaler else loss).backward()
    if opt is not None:
        (scaler.step(opt) if scaler else opt.step())
        opt.zero_grad()
    if layer is not None:
        layer.step(loss.detach(), scaler)
    return loss


def test_parameters_and_buffers_never_change_over_a_lifecycle(make_layer, drive):
    layer = make_layer(max_active_seeds=5)
    params, buffers = structure(layer), [n for n, _ in layer.named_buffers()]
    x = torch.randn(6, 12)
    drive(layer, 0, S.FOSSILIZED)
    drive(layer, 1, S.EVALUATING, blueprint="linear")
    layer.transition(1, S.CULLED)
    drive(layer, 2, S.GRAFTING, blueprint="low_rank")
    layer.transition(2, S.ROLLED_BACK)
    for _ in range(3):
        train_step(layer, x, layer=layer)
        layer.end_epoch(0.5)
    assert structure(layer) == params
    assert [n for n, _ in layer.named_buffers()] == buffers


class Both:
    """Every command applied to several layers (a compiled model's and its eager copy's)."""

    def __init__(self, *layers: KasminaLayer) -> None:
        self.layers = layers

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            results = [getattr(layer, name)(*args, **kwargs) for layer in self.layers]
            return results[0]
        return call


def lifecycle(layer, run) -> None:
    """Every kind of change a layer goes through, with training and evaluation between."""
    layer.germinate(0, "residual_mlp")
    run()
    layer.transition(0, S.TRAINING)
    run()
    layer.transition(0, S.GRAFTING, force=True)
    run()
    layer.germinate(2, "linear", "performance_linked")
    layer.transition(2, S.TRAINING)
    run()
    layer.transition(2, S.CULLED)
    for stage in (S.STABILIZATION, S.EVALUATING):
        layer.transition(0, stage, force=True)
        run()
    layer.set_counterfactual([0])
    run()
    layer.set_counterfactual([])
    for stage in (S.FINE_TUNING, S.FOSSILIZED):
        layer.transition(0, stage, force=True)
        run()
    layer.germinate(3, "low_rank")
    layer.transition(3, S.TRAINING)
    run()
    layer.transition(3, S.ROLLED_BACK)
    run()


# torch 2.13's dynamo instantiates every autograd.Function it traces and warns about its own
# call (a torch-internal deprecation, not a use of ours).
@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be "
                            "instantiated:DeprecationWarning")
@pytest.mark.parametrize("rows_matmul", [False, True])
def test_a_compiled_model_never_recompiles_over_a_whole_lifecycle(rows_matmul, monkeypatch):
    """rows_matmul: the blueprints' matmul as CUDA runs it (blueprints._RowsMatmul, its weight
    gradients split over row blocks: here in 2), traced by dynamo like the rest."""
    if rows_matmul:
        from kasmina import blueprints
        monkeypatch.setattr(blueprints, "_mm", lambda x, w, b=None: blueprints._RowsMatmul.apply(
            x, w, b))
        # (cached, as the real one: dynamo warns on an lru_cache it traces, s14h on the GPU)
        monkeypatch.setattr(blueprints, "_row_splits", functools.lru_cache(
            lambda n, seeds: 2 if n % 2 == 0 else 1))
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(8, 25), 5, KasminaConfig(max_active_seeds=5))
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), layer, nn.Linear(25, 3))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(16, 6)

    def run():
        for m, lyr in ((compiled, layer), (eager, eager[2])):
            m.train()
            train_step(m, x, layer=lyr)
            lyr.end_epoch(0.5)
            m.eval()
            with torch.no_grad():
                m(x)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager(x))

    run()  # warm-up: one graph for training, one for evaluation
    torch._dynamo.config.error_on_recompile = True
    try:
        lifecycle(Both(layer, eager[2]), run)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert layer.stage_of(0) is S.FOSSILIZED and layer.stage_of(3) is S.ROLLED_BACK


def test_state_dict_is_tensors_only_and_round_trips_through_safetensors(tmp_path, make_layer,
                                                                        drive):
    from safetensors.torch import load_file, save_file

    layer = make_layer()
    drive(layer, 1, S.EVALUATING)
    x = torch.randn(4, 12)
    train_step(layer, x, layer=layer)
    layer.end_epoch(0.3)
    state = layer.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "layer.safetensors")
    fresh = make_layer()
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert fresh.stage_of(1) is S.EVALUATING and fresh.epoch == layer.epoch
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))


def test_grad_scaler_unscales_the_seeds_gradients_and_overflow_is_not_a_rollback(make_layer,
                                                                                 drive):
    plain = make_layer()
    drive(plain, 1, S.GRAFTING)
    plain.alpha[1] = 0.5
    scaled = copy.deepcopy(plain)
    x = torch.randn(8, 12)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    train_step(plain, x, layer=plain)
    train_step(scaled, x, layer=scaled, scaler=scaler)
    lane = int(plain.slot[1])
    torch.testing.assert_close(scaled.lane_grad_norm[lane], plain.lane_grad_norm[lane])
    for name, p in plain.banks["1"].params.items():
        torch.testing.assert_close(scaled.banks["1"].params[name], p)
    # An fp16 overflow (inf gradients) skips the seeds' step as the scaler skips the host's.
    before = {n: p.detach().clone() for n, p in scaled.banks["1"].params.items()}
    scaled(x).sum().backward()
    scaled.banks["1"].named_grads["w1"].fill_(float("inf"))
    scaled.step(None, scaler)
    assert not scaled.lane_nonfinite.any()
    assert all(torch.equal(p, before[n]) for n, p in scaled.banks["1"].params.items())
    scaled.end_epoch(0.1)
    assert scaled.stage_of(1) is S.GRAFTING


def test_bf16_autocast_trains_a_growing_layer(make_layer, drive):
    layer = make_layer()
    drive(layer, 0, S.TRAINING)
    drive(layer, 2, S.GRAFTING)
    layer.alpha[2] = 0.5  # the ramp starts at 0, where the blend has no gradient yet
    x = torch.randn(8, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    layer.step()
    report = layer.end_epoch(0.1)
    assert layer.stage_of(2) is S.GRAFTING and report.grad_norm[2] > 0


@pytest.mark.parametrize("growing", [False, True])
def test_an_empty_batch_passes_through(make_layer, drive, growing):
    layer = make_layer()
    if growing:
        drive(layer, 0, S.TRAINING)
        drive(layer, 1, S.GRAFTING)
    x = torch.randn(0, 12, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 23)
    out.sum().backward()
    layer.step()
    layer.end_epoch(0.1)


def test_the_controllers_mode_sets_the_direction_of_every_contribution(make_layer, drive):
    layer = make_layer()
    model = nn.Sequential(layer)
    LocalController(model, ControllerConfig(mode="min"))
    assert layer.config.mode == "min"
    drive(layer, 1, S.EVALUATING)
    layer.measure_contributions(lambda: 0.7, val_metric=0.5)  # loss 0.7 without the seed
    assert layer.table.records[1].contributions == [pytest.approx(0.2)]
    with pytest.raises(ValueError, match="mode"):
        LocalController(model, ControllerConfig(mode="lower"))


def test_end_epoch_without_a_metric_warns_and_judges_nothing(make_layer, drive):
    layer = make_layer()
    ctl = LocalController(nn.Sequential(layer))
    drive(layer, 1, S.EVALUATING)
    with pytest.warns(RuntimeWarning, match="no validation metric"):
        ctl.end_epoch(None, evaluate=lambda: 0.5)
    assert layer.stage_of(1) is S.EVALUATING and not layer.table.records[1].contributions


def test_the_controller_puts_a_model_left_in_eval_mode_back_in_train_mode(make_layer, drive):
    layer = make_layer()
    model = nn.Sequential(layer)
    ctl = LocalController(model)
    drive(layer, 0, S.TRAINING)
    x = torch.randn(8, 12)

    def validate() -> float:
        model.eval()  # as users write it: no model.train() after
        with torch.no_grad():
            return float(model(x).pow(2).mean())

    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                train_step(model, x)
                ctl.step()
            ctl.end_epoch(validate(), evaluate=validate)
        assert model.training
    assert layer.epoch == 2


def test_a_layer_stepped_only_in_eval_mode_warns(make_layer, drive):
    layer = make_layer()
    drive(layer, 0, S.TRAINING)
    layer.eval()
    for _ in range(3):
        layer(torch.randn(4, 12))
        layer.step()
    with pytest.warns(RuntimeWarning, match="eval mode"):
        layer.end_epoch(0.1)


def test_the_layer_is_a_seed_layer_and_the_controllers_use_only_that(make_layer):
    import inspect

    from kasmina import SeedLayer, controller
    from kasmina.fleet import wire

    assert isinstance(make_layer(), SeedLayer)
    for module in (controller, wire):  # no private field of a layer read above it
        source = inspect.getsource(module)
        assert "layer._" not in source and ".table" not in source, module.__name__


def test_the_step_drops_the_gradients_of_idle_banks(make_layer, drive):
    layer = make_layer()
    drive(layer, 0, S.GRAFTING)  # residual_mlp runs; the other banks are idle
    idle = layer.banks["3"]
    idle.flat.grad = torch.ones_like(idle.flat)  # as a compiled graph, which runs every bank
    layer.step()
    assert idle.flat.grad is None


def test_drop_in_surface_of_the_host(make_layer):
    layer = make_layer()
    assert layer.weight is layer.host.weight and layer.bias is layer.host.bias
    assert (layer.in_features, layer.out_features) == (12, 23)
    assert kasmina.host_parameters(nn.Sequential(layer)) == list(layer.host.parameters())
