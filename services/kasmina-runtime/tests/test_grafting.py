from __future__ import annotations

import kasmina
import pytest
import torch
from kasmina import GraftingStrategy, KasminaConfig, SeedStage, get_strategy, register_strategy
from kasmina.strategies import GraftContext


def ctx(n=3, steps=1, drift=0.0, grad=0.5, loss=None, state=None, **cfg):
    return GraftContext(steps=torch.full((n,), steps), drift=torch.full((n,), drift),
                        grad_norm=torch.full((n,), grad), loss=loss,
                        state=torch.zeros(n, 2) if state is None else state,
                        config=KasminaConfig(**cfg))


def graft(make_layer, drive, strategy, steps, loss_fn=lambda i: None, **cfg):
    layer = make_layer(**cfg)
    drive(layer, 0, SeedStage.GRAFTING, strategy=strategy)
    x = torch.randn(8, 12)
    alphas = []
    for i in range(steps):
        layer(x).pow(2).mean().backward()
        layer.step(loss_fn(i))
        alphas.append(float(layer.alpha[0]))
    return layer, alphas


@pytest.mark.parametrize("strategy", ["fixed_ramp", "performance_linked", "drift_controlled",
                                      "grad_norm_gated"])
def test_every_strategy_gets_what_it_reads_from_the_layer(make_layer, drive, strategy):
    """The layer fills only the GraftContext fields a strategy names in `reads`: each built-in
    one still ramps through a layer (a field it reads but did not name would be None)."""
    _, alphas = graft(make_layer, drive, strategy, 5, lambda i: 5.0 - i,
                      grad_norm_lower=0.0, grad_norm_upper=1e9, drift_threshold=1e9)
    assert 0 < alphas[0] <= alphas[-1] <= 1


def test_a_strategy_that_names_nothing_reads_every_field(make_layer, drive):
    seen = {}

    class Watcher(GraftingStrategy):
        name, id = "test_watcher", 97

        def update(self, alpha, ctx):
            seen.update({f: getattr(ctx, f) is not None for f in
                         ("steps", "drift", "grad_norm", "state", "ramp_steps")})
            return alpha, ctx.state

    register_strategy(Watcher)
    graft(make_layer, drive, "test_watcher", 1)
    assert seen == dict.fromkeys(seen, True) and len(seen) == 5


def test_ids_are_stable():
    assert [get_strategy(n).id for n in ("fixed_ramp", "performance_linked", "drift_controlled",
                                         "grad_norm_gated")] == [0, 1, 2, 3]


@pytest.mark.parametrize("ramp", [1, 7, 30])
def test_fixed_ramp_reaches_one_after_exactly_ramp_steps(make_layer, drive, ramp):
    layer, alphas = graft(make_layer, drive, "fixed_ramp", ramp + 3, ramp_steps=ramp)
    if ramp > 1:
        assert alphas[ramp - 2] < 1.0
    assert alphas[ramp - 1] == 1.0 and alphas[-1] == 1.0
    assert alphas == sorted(alphas)
    layer.end_epoch()
    assert layer.readiness() == {0: SeedStage.STABILIZATION}


def test_performance_linked_speeds_up_while_loss_improves_and_never_decreases(make_layer, drive):
    _, falling = graft(make_layer, drive, "performance_linked", 10, lambda i: 10.0 - i)
    _, rising = graft(make_layer, drive, "performance_linked", 10, lambda i: 1.0 + i)
    _, plain = graft(make_layer, drive, "fixed_ramp", 10)
    assert falling[-1] > plain[-1] > rising[-1] > 0
    assert rising == sorted(rising) and falling == sorted(falling)


def test_drift_controlled_holds_while_drift_is_high():
    s = get_strategy("drift_controlled")
    alpha = torch.tensor([0.2, 0.2])
    c = ctx(n=2)
    c.drift = torch.tensor([0.5, 0.01])
    new, _ = s.update(alpha, c)
    assert new[0] == 0.2 and new[1] == pytest.approx(0.2 + 1 / 30)


def test_grad_norm_gated_ramps_only_inside_the_band():
    s = get_strategy("grad_norm_gated")
    alpha = torch.full((3,), 0.5)
    c = ctx()
    c.grad_norm = torch.tensor([0.05, 0.5, 2.0])
    new, _ = s.update(alpha, c)
    assert new.tolist() == pytest.approx([0.5, 0.5 + 1 / 30, 0.5])


@pytest.mark.parametrize("name", ["drift_controlled", "grad_norm_gated", "performance_linked"])
def test_alpha_stays_in_unit_interval_in_the_layer(make_layer, drive, name):
    layer, alphas = graft(make_layer, drive, name, 80, lambda i: 1.0 / (i + 1), ramp_steps=3,
                          grad_norm_lower=0.0, grad_norm_upper=1e9, drift_threshold=1e9)
    assert all(0.0 <= a <= 1.0 for a in alphas) and alphas[-1] == 1.0


def test_a_plugged_in_strategy_is_used_by_name_and_checkpointed_by_id(make_layer, drive):
    @register_strategy
    class Instant(GraftingStrategy):
        name, id = "instant_test", 77

        def update(self, alpha, ctx):
            return torch.full_like(alpha, 5.0), ctx.state  # the layer clamps to 1

    layer, alphas = graft(make_layer, drive, "instant_test", 1)
    assert alphas == [1.0] and int(layer.state[0, 3]) == 77
    with pytest.raises(ValueError):
        register_strategy(type("Clash", (GraftingStrategy,), {"name": "fixed_ramp", "id": 99}))
    with pytest.raises(kasmina.UnknownStrategyError):
        get_strategy("nope")


@pytest.mark.parametrize("n", [3, 7, 12, 30, 49])
def test_the_shared_ramp_reaches_one_after_n_steps(n):
    """performance_linked without a loss, drift_controlled and grad_norm_gated ramp by adding
    1/n: after n updates alpha is exactly 1 (float32 sums alone fall short for some n)."""
    alpha = torch.zeros(2)
    ctx = GraftContext(steps=torch.ones(2), drift=torch.zeros(2), grad_norm=torch.zeros(2),
                       loss=None, state=torch.zeros(2, 2), config=KasminaConfig(ramp_steps=n))
    for i in range(n):
        assert bool((alpha < 1).all()), i
        alpha = GraftingStrategy.ramp(alpha, ctx)
    assert torch.equal(alpha, torch.ones(2))
