"""The Triton kernels against the PyTorch reference (interpreter on CPU, real on CUDA), the
custom ops' registrations (opcheck), and torch.compile through a seed layer."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():  # must precede the kernels' @triton.jit decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kasmina import KasminaConfig, KasminaLayer, SeedStage, kernels  # noqa: E402
from kasmina.bank import BlueprintBank  # noqa: E402
from kasmina.blueprints import BlueprintSpec  # noqa: E402
from kasmina.kernels import reference, triton_blend  # noqa: E402
from kasmina.kernels.tolerances import STATS_RTOL, TOLERANCES  # noqa: E402
from torch import nn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (features, seeds, running seeds with their effective alpha): prime widths, ragged chunks,
# chunk size 1, alpha 0 (TRAINING) next to blending seeds.
CASES = [(23, 5, {1: 0.5, 3: 0.0}), (7, 7, {0: 1.0, 6: 0.25}), (130, 3, {2: 0.7}),
         (13, 1, {0: 0.3}), (64, 4, {0: 0.5, 2: 0.0, 3: 1.0}), (40, 5, {1: 0.5, 4: 0.9})]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def blend_inputs(features, seeds, running, dtype, rows=37):
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(4, features), seeds,
                         KasminaConfig(max_active_seeds=seeds, blueprints=("residual_mlp",)))
    for s in running:
        layer.germinate(s, "residual_mlp")
        layer.transition(s, SeedStage.TRAINING)
    plan = SimpleNamespace(run_of=layer.run_of.to(DEVICE), bounds=layer.bounds.to(DEVICE),
                           align=layer._align)
    h = torch.randn(rows, features, device=DEVICE).to(dtype)
    h[0, 0] = 0.0  # a dead value
    owner = layer.table.lane_owner().tolist()  # every lane, free ones included (alpha 0)
    y = torch.randn(len(owner), rows, layer.chunk_width, device=DEVICE)
    alpha = torch.tensor([running.get(s, 0.0) for s in owner], device=DEVICE)
    return h, y, alpha, plan


def close(a, b, dtype):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


@pytest.fixture(params=["one pass", "two passes"])
def blend_form(request, monkeypatch):
    """Both forms of the Triton blend on every case: the launcher picks by size, so force it."""
    monkeypatch.setattr(triton_blend, "MIN_TWO_PASS_BYTES",
                        2**62 if request.param == "one pass" else 0)
    monkeypatch.setattr(triton_blend, "WIDE_CHUNK", 2)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features,seeds,running", CASES)
def test_chunk_blend_kernel_matches_reference(features, seeds, running, dtype, blend_form):
    h, y, alpha, plan = blend_inputs(features, seeds, running, dtype)
    out, stats = triton_blend.chunk_blend(h, y, alpha, plan.run_of, plan.bounds, True, 1e-6,
                                          plan.align)
    ref = reference.chunk_blend(h, y, alpha, plan.run_of, plan.bounds)
    close(out, ref, dtype)
    untouched = alpha[plan.run_of.long().clamp(min=0)].eq(0) | plan.run_of.lt(0)
    assert torch.equal(out[:, untouched], h[:, untouched])  # identity is exact
    torch.testing.assert_close(stats, reference.column_stats(h, 1e-6), rtol=STATS_RTOL,
                               atol=1e-5)
    out2, empty = triton_blend.chunk_blend(h, y, alpha, plan.run_of, plan.bounds, False, 1e-6,
                                            plan.align)
    assert torch.equal(out2, out) and empty.shape == (0, features)


def test_seed_pass_strides_over_row_blocks_past_the_grid_limit(monkeypatch):
    monkeypatch.setattr(triton_blend, "MIN_TWO_PASS_BYTES", 0)
    h, y, alpha, plan = blend_inputs(64, 4, {0: 0.5, 3: 1.0}, torch.float32, rows=70)
    args = (h, y, alpha, plan.run_of, plan.bounds, False, 1e-6, plan.align)
    whole = triton_blend.chunk_blend(*args)[0]
    monkeypatch.setattr(triton_blend, "MAX_GRID_Y", 1)  # one program walks every row block
    assert torch.equal(triton_blend.chunk_blend(*args)[0], whole)
    close(whole, reference.chunk_blend(h, y, alpha, plan.run_of, plan.bounds),
          torch.float32)


def test_int64_offsets_give_the_same_result(monkeypatch, blend_form):
    h, y, alpha, plan = blend_inputs(40, 5, {1: 0.5, 4: 0.9}, torch.float32)
    args = (h, y, alpha, plan.run_of, plan.bounds, True, 1e-6, plan.align)
    narrow, stats = triton_blend.chunk_blend(*args), triton_blend.column_stats(h, 1e-6)
    monkeypatch.setattr(triton_blend, "needs_i64", lambda *_: True)
    wide = triton_blend.chunk_blend(*args)
    assert torch.equal(narrow[0], wide[0])  # no atomics in the output: bit for bit
    # The statistics' atomics may add in another order on a GPU.
    torch.testing.assert_close(wide[1], narrow[1], rtol=STATS_RTOL, atol=1e-5)
    torch.testing.assert_close(triton_blend.column_stats(h, 1e-6), stats, rtol=STATS_RTOL,
                               atol=1e-5)


@pytest.mark.parametrize("features,seeds,align", [(23, 5, 1), (64, 4, 16), (40, 5, 8),
                                                  (96, 4, 8), (130, 3, 1)])
def test_plan_align_divides_every_running_chunk(features, seeds, align):
    _, _, _, plan = blend_inputs(features, seeds, {seeds - 1: 0.5, 0: 0.5}, torch.float32)
    assert plan.align == align
    assert (plan.bounds % plan.align == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,features", [(1, 1), (37, 23), (70, 130)])
def test_column_stats_kernel_matches_reference(rows, features, dtype):
    h = torch.randn(rows, features, device=DEVICE).to(dtype)
    h[:, 0] = 0.0
    got = triton_blend.column_stats(h, 1e-6)
    torch.testing.assert_close(got, reference.column_stats(h, 1e-6), rtol=STATS_RTOL, atol=1e-5)
    assert got[2, 0] == rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features,seeds,rows", [(23, 5, 37), (7, 7, 5), (130, 3, 300)])
def test_observe_in_one_launch_accumulates_what_add_of_the_stats_does(features, seeds, rows,
                                                                      dtype):
    """The dormant layer's tracking step, one launch (column tiles x row slabs adding into the
    float64 accumulators, the row count, the correlation sample): against `add` of the PyTorch
    reference's statistics, over two steps (the second adds to the first), on a strided h (a
    slice of a wider output): ragged chunks, chunks of one feature (7 over 7: no correlation
    programs), two column tiles and more rows than are sampled (130 x 300)."""
    from kasmina.telemetry import SeedTelemetry
    chunks = KasminaLayer(nn.Linear(1, features), seeds).chunks
    cfg = KasminaConfig(correlation_features=4)
    ours, want = (SeedTelemetry(chunks, cfg, torch.device(DEVICE)) for _ in range(2))
    for step in range(2):
        torch.manual_seed(step)
        h2 = torch.randn(rows, features + 3, device=DEVICE).to(dtype)[:, 2:features + 2]
        h2[0, 0] = 0.0  # a dead value
        ours.observe(h2, 1e-6, triton=True)
        want.add(reference.column_stats(h2, 1e-6), h2)
    for name, t in ours.named_buffers():
        torch.testing.assert_close(t, getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)
    assert ours.columns[2, 0] == 2 and ours.rows == 2 * rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features,seeds,rows,k", [(23, 5, 37, 4), (130, 3, 300, 4),
                                                   (7, 7, 5, 4), (64, 4, 80, 4),
                                                   (130, 3, 300, 16)])
def test_telemetry_kernel_accumulates_what_the_pytorch_form_does(features, seeds, rows, k,
                                                                 dtype):
    """Two steps into the same accumulators, on a strided h (a slice of a wider output):
    k = 1 (chunks of one feature: no correlation), ragged chunks narrower than k (padded),
    more rows than are sampled (300 > 256), k = 16 (a row block of 16: its product tile)."""
    from kasmina.kernels import triton_telemetry
    from kasmina.telemetry import SeedTelemetry
    chunks = KasminaLayer(nn.Linear(1, features), seeds).chunks
    cfg = KasminaConfig(correlation_features=k)
    ours, want = (SeedTelemetry(chunks, cfg, torch.device(DEVICE)) for _ in range(2))
    for step in range(2):
        torch.manual_seed(step)
        wide = torch.randn(rows, features + 3, device=DEVICE).to(dtype)
        h2 = wide[:, 1:features + 1]
        stats = reference.column_stats(h2, 1e-6)
        want.add(stats, h2)
        triton_telemetry.add(stats, h2, ours.corr_idx, ours.corr_valid, ours.columns, ours.rows,
                             ours.corr_sum, ours.corr_prod, ours.corr_n, ours.rows_sampled)
    for name, t in ours.named_buffers():
        torch.testing.assert_close(t, getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)
    assert ours.rows == 2 * rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_gradients_match_the_reference_and_keep_identity_exact(dtype):
    h, y, alpha, plan = blend_inputs(23, 5, {1: 0.5, 3: 0.0, 4: 1.0}, dtype)
    g = torch.randn_like(h)
    grads = []
    for op in (torch.ops.kasmina.chunk_blend, None):
        hh, yy = h.clone().requires_grad_(), y.clone().requires_grad_()
        if op is None:
            out = reference.chunk_blend(hh, yy, alpha, plan.run_of, plan.bounds)
        else:
            out, _ = op(hh, yy, alpha, plan.run_of, plan.bounds, True, 1e-6,
                        plan.align)
        out.backward(g)
        grads.append((hh.grad, yy.grad))
    (gh, gy), (rh, ry) = grads
    close(gh, rh, dtype)
    torch.testing.assert_close(gy, ry)
    identity = plan.run_of.lt(0) | alpha[plan.run_of.long().clamp(min=0)].eq(0)
    assert torch.equal(gh[:, identity], g[:, identity])


def test_opcheck_passes_for_every_op():
    h, y, alpha, plan = blend_inputs(23, 5, {1: 0.5, 3: 0.0}, torch.float32, rows=9)
    hh, yy = h.requires_grad_(), y.requires_grad_()
    for track in (True, False):
        torch.library.opcheck(torch.ops.kasmina.chunk_blend,
                              (hh, yy, alpha, plan.run_of, plan.bounds, track, 1e-6,
                               plan.align))
    torch.library.opcheck(torch.ops.kasmina.column_stats, (h.detach(), 1e-6))
    g = torch.randn_like(h)
    torch.library.opcheck(torch.ops.kasmina.chunk_blend_backward,
                          (g, alpha, plan.run_of, plan.bounds, y.shape[2]))


def test_layer_selects_the_path_and_both_agree():
    torch.manual_seed(0)
    layers = {}
    for path in ("torch", "triton"):
        torch.manual_seed(0)
        # one bank: its output is the blend's input as it stands (no cat makes it contiguous)
        layer = KasminaLayer(nn.Linear(6, 23), 5, KasminaConfig(
            kernels=path, blueprints=("residual_mlp",))).to(DEVICE)
        layer.germinate(2, "residual_mlp")
        for stage in (SeedStage.TRAINING, SeedStage.GRAFTING):
            layer.transition(2, stage, force=True)
        layer.alpha[2] = 0.5
        layers[path] = layer
    assert layers["triton"]._triton and not layers["torch"]._triton
    x = torch.randn(11, 6, device=DEVICE)
    outs = {k: layer(x) for k, layer in layers.items()}
    close(outs["triton"], outs["torch"], torch.float32)
    for out in outs.values():
        out.sum().backward()
    close(layers["triton"].host.weight.grad, layers["torch"].host.weight.grad, torch.float32)
    banks = {k: layer.banks["1"] for k, layer in layers.items()}
    torch.testing.assert_close(banks["triton"].flat.grad, banks["torch"].flat.grad)
    for layer in layers.values():
        layer.step()  # the fused seed step and the PyTorch one
    torch.testing.assert_close(banks["triton"].flat, banks["torch"].flat)
    torch.testing.assert_close(layers["triton"].lane_drift, layers["torch"].lane_drift)
    reports = {k: layer.end_epoch() for k, layer in layers.items()}
    for stat in ("chunk_variance", "dead_ratio", "mean_abs_correlation"):
        torch.testing.assert_close(getattr(reports["triton"], stat),
                                   getattr(reports["torch"], stat), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk,hidden", [(4, 16), (3, 5), (1, 16), (8, 16), (16, 8), (16, 16),
                                          (9, 16), (20, 6), (64, 16), (32, 64)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_residual_mlp_matches_the_bank_formula(chunk, hidden, input_grad):
    """Both forms: unrolled columns up to 8 features, tiles (triton_mlp_wide) from 9 (padded
    to 16: 9, 20) to 64, hidden units padded to a tile's 16 (8, 6)."""
    from kasmina.kernels import triton_mlp, triton_mlp_wide
    assert kernels.fused_mlp_fits(chunk, hidden)
    wide = chunk > 8
    assert kernels.ops.wide_mlp(chunk, hidden) == wide
    for backward, tiles, columns in ((False, triton_mlp_wide.mlp_fwd_kernel, "_mlp_fwd_kernel"),
                                     (True, triton_mlp_wide.mlp_bwd_kernel, "_mlp_bwd_kernel")):
        ran = triton_mlp._form(chunk, hidden, backward)[0]  # the kernel the launcher takes
        assert ran is (tiles if wide else getattr(triton_mlp, columns))
    bank = BlueprintBank(BlueprintSpec("t", "residual_mlp", 1, hidden=hidden), chunk, 3,
                         torch.device(DEVICE))
    for slot in range(3):
        bank.init_slot(slot, 100 + slot)
    x = torch.randn(3, 37, chunk, device=DEVICE, requires_grad=input_grad)
    dy = torch.randn(3, 37, chunk, device=DEVICE)
    results = []
    for fused in (False, True):
        y = bank(x, triton=fused)
        wrt = (x, bank.flat) if input_grad else (bank.flat,)
        results.append((y, *torch.autograd.grad(y, wrt, dy)))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_residual_mlp_is_not_used_past_its_width():
    assert not kernels.fused_mlp_fits(128, 16)  # past the tiles' 64: the GEMMs stay
    assert not kernels.fused_mlp_fits(16, 128)  # 128 hidden units: past both forms
    assert not kernels.fused_mlp_fits(8, 256)  # charlm's block: the GEMMs
    assert kernels.fused_mlp_fits(64, 16) and kernels.fused_mlp_fits(4, 64)
    for chunk in (128, 256):
        bank = BlueprintBank(BlueprintSpec("t", "residual_mlp", 1, hidden=16), chunk, 2,
                             torch.device(DEVICE))
        assert not bank._fusable


def test_opcheck_passes_for_the_fused_blueprint():
    bank = BlueprintBank(BlueprintSpec("t", "residual_mlp", 1, hidden=16), 4, 2,
                         torch.device(DEVICE))
    bank.init_slot(0, 1)
    x = torch.randn(2, 9, 4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.kasmina.residual_mlp, (x, bank.flat, 16))
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.kasmina.residual_mlp_backward,
                              (x.detach(), bank.flat.detach(), torch.randn_like(x), 16, need_dx))


@pytest.mark.parametrize("weight_decay,overflow_ok,scaled", [
    (0.0, False, False), (0.01, False, True), (0.0, True, True)])
def test_fused_seed_step_matches_the_pytorch_step(weight_decay, overflow_ok, scaled):
    cfg = KasminaConfig(seed_weight_decay=weight_decay)
    banks = [BlueprintBank(BlueprintSpec("t", "residual_mlp", 1, hidden=16), 4, 5,
                           torch.device(DEVICE)) for _ in range(2)]
    for bank in banks:
        for slot in range(5):
            bank.init_slot(slot, 7 + slot)
    trainable = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool, device=DEVICE)
    scale = torch.tensor([1.0, 2.0, 3.0, 1024.0, 1.0], device=DEVICE) if scaled else None
    for step in range(3):
        grad = torch.randn_like(banks[0].flat)
        if step == 1:
            grad[3, 2] = float("nan")  # a non-finite slot: no step (and flagged unless AMP)
        outs = []
        for fused, bank in zip((False, True), banks, strict=True):
            bank.flat.grad = grad.clone()
            outs.append(bank.seed_step(trainable, cfg, scale, overflow_ok, triton=fused))
            assert bank.flat.grad is None
        for got, want in zip(outs[1], outs[0], strict=True):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, equal_nan=True)
        for name in ("flat", "exp_avg", "exp_avg_sq", "ema", "opt_step"):
            torch.testing.assert_close(getattr(banks[1], name), getattr(banks[0], name))
    assert banks[1].opt_step.tolist() == [3.0, 3.0, 0.0, 2.0, 3.0]


@pytest.mark.parametrize("fused", [False, True])
def test_seed_step_takes_each_slots_own_lr_in_one_call(fused):
    """Per-slot rates (a seed's spec's seed_lr; 0: the config's): each slot steps exactly as a
    one-slot step at its rate, in one call over the bank."""
    cfg = KasminaConfig(seed_lr=1e-3)
    rates = [1e-2, 0.0, 3e-3]
    bank, ref = (BlueprintBank(BlueprintSpec("t", "residual_mlp", 1, hidden=4), 3, 3,
                               torch.device(DEVICE)) for _ in range(2))
    for b in (bank, ref):
        for slot in range(3):
            b.init_slot(slot, 11 + slot)
    grad = torch.randn_like(bank.flat)
    bank.flat.grad = grad.clone()
    bank.seed_step(torch.ones(3, dtype=torch.bool, device=DEVICE), cfg, triton=fused,
                   lr=torch.tensor(rates, device=DEVICE))
    for slot, rate in enumerate(rates):
        ref.flat.grad = grad.clone()
        ref.seed_step(torch.arange(3, device=DEVICE) == slot,
                      cfg.replace(seed_lr=rate or cfg.seed_lr), triton=fused)
    for name in ("flat", "exp_avg", "exp_avg_sq", "ema", "opt_step"):
        assert torch.equal(getattr(bank, name), getattr(ref, name)), name


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("overflow_ok", [False, True])
def test_seed_step_into_the_lanes_matches_the_returning_form(fused, overflow_ok):
    """`into` (the layer's form) writes what the returning form returns: grad norm and drift
    into the lane views, and nonfinite |= running & ~finite (never under a GradScaler); a
    flag already set stays set."""
    cfg = KasminaConfig()
    banks = [BlueprintBank(BlueprintSpec("t", "residual_mlp", 1, hidden=16), 4, 5,
                           torch.device(DEVICE)) for _ in range(2)]
    for bank in banks:
        for slot in range(5):
            bank.init_slot(slot, 3 + slot)
    trainable = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool, device=DEVICE)
    running = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool, device=DEVICE)
    lanes = torch.zeros(3, 7, device=DEVICE)  # (grad_norm, drift, pad): views at lanes 1..5
    nonfinite = torch.tensor([0, 0, 0, 0, 0, 1, 0], dtype=torch.bool, device=DEVICE)
    grad = torch.randn_like(banks[0].flat)
    grad[1, 0] = grad[3, 0] = float("nan")  # running and not: only slot 1 is flagged
    banks[0].flat.grad, banks[1].flat.grad = grad.clone(), grad.clone()
    norm, finite, drift = banks[0].seed_step(trainable, cfg, overflow_ok=overflow_ok,
                                             triton=fused)
    assert banks[1].seed_step(trainable, cfg, overflow_ok=overflow_ok, triton=fused,
                              into=(lanes[0, 1:6], lanes[1, 1:6], nonfinite[1:6],
                                    running)) is None
    torch.testing.assert_close(lanes[0, 1:6], norm, equal_nan=True)
    torch.testing.assert_close(lanes[1, 1:6], drift)
    assert lanes[:, 0].eq(0).all() and lanes[:, 6].eq(0).all()  # nothing outside the views
    want = [False] + (~finite & running).tolist() + [False]
    want[5] = True  # already set: stays
    assert nonfinite.tolist() == want
    assert want[2] is (not overflow_ok)  # slot 1: running and NaN
    for name in ("flat", "exp_avg", "exp_avg_sq", "ema", "opt_step"):
        torch.testing.assert_close(getattr(banks[1], name), getattr(banks[0], name))


# Dynamo itself instantiates autograd.Function classes while tracing and warns about it.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method. is deprecated:DeprecationWarning")
def test_torch_compile_traces_the_layer_without_graph_breaks():
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 23), 5, KasminaConfig(kernels="triton")).to(DEVICE)
    layer.germinate(1, "residual_mlp")
    layer.transition(1, SeedStage.TRAINING)
    layer.germinate(3, "residual_mlp")
    for stage in (SeedStage.TRAINING, SeedStage.GRAFTING):
        layer.transition(3, stage, force=True)
    layer.alpha[3] = 0.5
    layer.train()
    x = torch.randn(8, 6, device=DEVICE)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_the_launchers_grid_arithmetic_is_tritons():
    import triton
    from kasmina.kernels.launch import cdiv, pow2
    assert all(pow2(n) == triton.next_power_of_2(n) for n in range(1, 2050))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in range(1, 40))


def test_the_launchers_key_holds_what_triton_specialises_on():
    """kernels.launch keeps one compiled kernel per key: two arguments Triton compiles apart
    must not share one (a 16-byte-aligned tensor and a view one element in, 1 and other
    integers, 32- and 64-bit integers, a float and an int)."""
    from kasmina.kernels.launch import _spec
    x = torch.zeros(8)
    assert _spec(x) != _spec(x[1:]) and _spec(x) == _spec(x[4:])
    assert _spec(x) != _spec(x.half())
    assert len({_spec(v) for v in (1, 2, 16, 2**31, 2**63, 0.0)}) == 6
    assert _spec(32) == _spec(48) and _spec(3) == _spec(5)


def test_the_launcher_sees_a_launch_hook():
    """A profiler's launch hook (Triton 3.6: a chain, empty by default) sends launches through
    Triton's runner, which calls it; with none set the launcher skips the empty chains."""
    from kasmina.kernels.launch import _hooked
    from triton import knobs
    chain = knobs.runtime.launch_enter_hook
    assert not _hooked(None) and _hooked(print)
    if hasattr(chain, "calls"):
        assert not _hooked(chain)
        chain.add(print)
        try:
            assert _hooked(chain)
        finally:
            chain.remove(print)


def test_the_launcher_keys_an_autotuned_kernel_on_its_tuning_arguments():
    """An autotuned kernel is tuned per size (N, F) as Triton does: those arguments' values
    are part of the launcher's key, not only their specialisation."""
    from kasmina.kernels.launch import fast
    k = fast(triton_blend._host_pass_kernel)
    assert k.tuned and [k.names[i] for i in k.tuning] == ["N", "F", "TRACK", "COPY", "I64"]
    h, stats = torch.zeros(64, 32), torch.zeros(3, 32)
    meta = {"TRACK": True, "COPY": False, "I64": False}
    key = lambda n: k.key((h, h, stats, n, 32, 32, 32, 1e-6), meta)  # noqa: E731
    assert key(64) != key(48) and key(64) == key(64)  # same specialisation, another size
    plain = fast(triton_blend._seed_blend_kernel)  # not autotuned: sizes of one specialisation
    assert not plain.tuned and plain.key((h, 64), {}) == plain.key((h, 48), {})
    # ... but not what Triton compiles apart: 1, an unaligned size, a view one element in
    assert plain.key((h, 1), {}) != plain.key((h, 48), {}) != plain.key((h, 47), {})
    assert plain.key((h.view(-1)[1:], 48), {}) != plain.key((h.view(-1), 48), {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the launcher's cache (CUDA; the "
                    "interpreter goes through Triton)")
def test_the_launcher_reuses_a_kernel_only_for_its_own_specialisation():
    """A compiled kernel specialised on an aligned pointer or an integer 1 must not be reused
    for a misaligned view or another integer; every result against torch."""
    import triton
    import triton.language as tl
    from kasmina.kernels.launch import fast

    @triton.jit
    def axpb(x_ptr, out_ptr, n, b, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2.0 + b, mask=i < n)

    base = torch.arange(70, device="cuda", dtype=torch.float32)
    k = fast(axpb)
    for x, b in ((base, 1), (base, 1), (base[1:], 1), (base, 5), (base[3:], 5), (base, 16)):
        out = torch.empty_like(x)
        k[(triton.cdiv(x.numel(), 32),)](x, out, x.numel(), b, BLOCK=32)
        torch.testing.assert_close(out, x * 2 + b)
    assert len(k.compiled) == 5  # the repeat reused its kernel; every other case compiled
