"""`summary` (what a grown model's parameters are made of) and `export` (the grown model as
plain torch modules, for serving: no seed machinery, no `kasmina` import to run or unpickle it).

A seed layer holds fixed banks with a slot for every seed that could grow (DESIGN §3.1), so
`model.parameters()` counts capacity, not what the seeds use: `summary` says both per layer.
`export` keeps what the layer computes in eval mode and drops the rest:
- a layer with no blueprint blended in becomes its host, as it was (`nn.Linear` or `Conv1D`);
- `linear` and `low_rank` blueprints, and the blend itself, are affine maps of the host output,
  so they are folded into the host's weight and bias (a single `nn.Linear` when nothing else
  grew there);
- `residual_mlp` blueprints stay as small `nn.Sequential(Linear, GELU, Linear)`s over slices of
  the host output, in a `torch.fx.GraphModule` (it pickles as its generated code plus torch
  modules, so loading it needs torch only).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .blueprints import ACTIVATIONS, DEFAULT_ACTIVATION, BlueprintSpec, get_blueprint
from .dual import DualPathLayer
from .layer import KasminaLayer
from .lifecycle import ACTIVE_STAGES, BLENDING_STAGES
from .seed_table import BLUEPRINT_ID
from .wrap import seed_layers

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class SeedLayerSummary:
    layer_id: str
    host: str  # the host's class name
    in_features: int
    out_features: int
    num_seeds: int
    stages: dict[str, int]  # stage name -> seeds in it (stages with none left out)
    params_in_use: int  # blueprint parameters of running and fossilized seeds
    bank_params: int  # blueprint parameters the banks hold (capacity), in use or not
    host_params: int


@dataclass(frozen=True)
class Summary:
    layers: list[SeedLayerSummary]
    total_parameters: int  # model.parameters(), bank capacity included

    @property
    def params_in_use(self) -> int:
        return sum(row.params_in_use for row in self.layers)

    @property
    def bank_params(self) -> int:
        return sum(row.bank_params for row in self.layers)

    def __str__(self) -> str:
        head = ("layer", "host", "features", "seeds", "stages", "in use", "capacity", "host params")
        rows = [(r.layer_id or "-", r.host, f"{r.in_features}->{r.out_features}",
                 str(r.num_seeds), ", ".join(f"{k} {v}" for k, v in r.stages.items()),
                 f"{r.params_in_use:,}", f"{r.bank_params:,}", f"{r.host_params:,}")
                for r in self.layers]
        rows.append(("total", "", "", str(sum(r.num_seeds for r in self.layers)), "",
                     f"{self.params_in_use:,}", f"{self.bank_params:,}",
                     f"{sum(r.host_params for r in self.layers):,}"))
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        left = 5  # columns up to `stages` read left-aligned, the counts right-aligned

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        rest = self.total_parameters - self.bank_params
        return "\n".join([line(head), *map(line, rows),
                          f"model.parameters(): {self.total_parameters:,} = {rest:,} outside "
                          f"the banks + {self.bank_params:,} bank capacity, of which "
                          f"{self.params_in_use:,} in use"])


def summary(model: nn.Module) -> Summary:
    """One row per seed layer of `model` (the model itself included, when it is one)."""
    rows = [SeedLayerSummary(
        layer_id=layer.layer_id, host=type(layer.host).__name__,
        in_features=layer.in_features, out_features=layer.out_features,
        num_seeds=layer.num_seeds, stages=layer.stage_counts,
        params_in_use=layer.params_added(),
        bank_params=sum(p.numel() for p in layer.banks.parameters()),
        host_params=sum(p.numel() for p in layer.host.parameters()))
        for layer in _active_layers(model)]
    return Summary(rows, sum(p.numel() for p in model.parameters()))


def _active_layers(model: nn.Module) -> list[KasminaLayer]:
    """Every seed layer, a `DualPathLayer` as its active path (one row per layer)."""
    return [getattr(layer, "active", layer) for layer in seed_layers(model)]


# ----------------------------------------------------------------------------------- export
@dataclass(frozen=True)
class _GrownSeed:
    seed: int
    start: int
    end: int
    spec: BlueprintSpec
    alpha: float  # its weight in the blend, as the forward pass uses it
    params: dict[str, Tensor]  # the seed's own slot, sliced to its real chunk width


def export(model: nn.Module, *, allow_active: bool = False) -> nn.Module:
    """A copy of `model` in which every seed layer is replaced by plain torch modules that
    compute what it computes in eval mode (`model` itself is left as it is).

    Every seed must have finished: DORMANT, CULLED, CANCELLED or ROLLED_BACK (the host's output)
    or FOSSILIZED (its blueprint, blended at its alpha); a seed in GERMINATED..FINE_TUNING
    raises a ValueError naming its layer, unless `allow_active`, which exports a snapshot:
    every seed at its current blend (TRAINING and GERMINATED ones as the host's output).
    Weights shared with the rest of the model (tied embeddings) stay shared, except a host
    weight that a blueprint was folded into, which gets its own copy."""
    dual = [name for name, m in model.named_modules() if isinstance(m, DualPathLayer)]
    if dual:
        raise TypeError(f"export does not take a DualPathLayer yet ({', '.join(dual)}): train "
                        f"on one path, then rebuild the layer as a KasminaLayer of that path "
                        f"and load its state (python -m kasmina migrate does it for a checkpoint)")
    layers = [m for m in model.modules() if isinstance(m, KasminaLayer)]
    if not allow_active:
        _check_finished(layers)
    memo: dict[int, object] = {}  # one memo: parameters tied to a host stay tied in the copy
    for layer in layers:
        memo[id(layer)] = _export_layer(layer, memo)
    exported = copy.deepcopy(model, memo)
    _keep_fused_paths_off(exported)
    return exported


def _check_finished(layers: list[KasminaLayer]) -> None:
    active = {layer.layer_id: {s: layer.stage_of(s).name for s in layer.seeds_in(*ACTIVE_STAGES)}
              for layer in layers}
    active = {layer_id: seeds for layer_id, seeds in active.items() if seeds}
    if active:
        listed = "; ".join(f"layer {layer_id!r}: seeds {seeds}"
                           for layer_id, seeds in active.items())
        raise ValueError(f"kasmina.export: seeds still in their lifecycle ({listed}); fossilize "
                         f"or cull them first, or pass allow_active=True to export every seed "
                         f"at its current alpha")


def _grown_seeds(layer: KasminaLayer) -> list[_GrownSeed]:
    """The seeds whose blueprint output is blended in (alpha > 0), as the forward pass sees
    them: a counterfactual seed counts as alpha 0, and so does one with non-finite parameters
    (the forward pass masks a lane whose output is not finite)."""
    table, grown = layer.table, []
    for seed in layer.seeds_in(*BLENDING_STAGES):
        alpha = 0.0 if seed in table.counterfactual else float(layer.alpha[seed])
        spec = get_blueprint(int(table.state[seed, BLUEPRINT_ID]))
        lane = int(table.slot[seed])
        start, end = layer.chunks[seed]
        bank, local = layer._bank_slot(lane)  # its bank may be another blueprint's (fits_bank)
        params = {n: bank.params[n][local][tuple(map(slice, shape))].detach().double()
                  for n, shape in spec.shapes(end - start).items()}
        if alpha != 0.0 and all(bool(p.isfinite().all()) for p in params.values()):
            grown.append(_GrownSeed(seed, start, end, spec, alpha, params))
    return grown


# A blueprint that is an affine map of its chunk, y = h @ m + c: (params, width) -> (m, c).
_AFFINE: dict[str, Callable[[dict[str, Tensor], int], tuple[Tensor, Tensor | None]]] = {
    "linear": lambda p, w: (p["w"], p["b"]),
    "low_rank": lambda p, w: (torch.eye(w, dtype=p["a"].dtype, device=p["a"].device)
                             + p["a"] @ p["b"], None),
}
_ACTIVATION_MODULES = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}
assert set(_ACTIVATION_MODULES) == set(ACTIVATIONS)
# A blueprint that stays a module: y = x + module(x), x the chunk in the module's dtype.
_RESIDUAL: dict[str, Callable[[dict[str, Tensor], BlueprintSpec], nn.Module]] = {
    "residual_mlp": lambda p, spec: nn.Sequential(
        _linear_of(p["w1"], p["b1"]),
        _ACTIVATION_MODULES[spec.activation or DEFAULT_ACTIVATION](),
        _linear_of(p["w2"], p["b2"])),
}


def _linear_of(w: Tensor, b: Tensor) -> nn.Linear:
    """nn.Linear computing x @ w + b."""
    linear = nn.Linear(*w.shape, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.T)
        linear.bias.copy_(b)
    return linear


def _export_layer(layer: KasminaLayer, memo: dict[int, object]) -> nn.Module:
    host = copy.deepcopy(layer.host, memo)
    seeds = _grown_seeds(layer)
    unknown = {s.spec.kind for s in seeds} - set(_AFFINE) - set(_RESIDUAL)
    if unknown:
        raise ValueError(f"kasmina.export: layer {layer.layer_id!r} grew blueprints of kinds "
                         f"{sorted(unknown)}, which export cannot write as torch modules")
    affine = [s for s in seeds if s.spec.kind in _AFFINE]
    if affine:
        _fold_into_host(host, affine)
    residual = [s for s in seeds if s.spec.kind in _RESIDUAL]
    return _residual_layer(host, layer, residual) if residual else host


def _fold_into_host(host: nn.Module, seeds: list[_GrownSeed]) -> None:
    """Fold affine blueprints into the host: h = x @ wt + b, so chunk c of the blended output,
    (1 - a) h_c + a (h_c @ m + c) = x @ (wt_c @ m') + (b_c @ m' + a c), m' = (1 - a) I + a m.
    Exact in real arithmetic; in float the folded layer rounds once where the grown one rounds
    after the host and after the blueprint, so the two agree to rounding (a few ulps of the
    host dtype, times the conditioning of m'). The products run in float64, then one cast.
    New Parameters: a host weight tied elsewhere (an embedding) keeps its old values there."""
    linear = isinstance(host, nn.Linear)
    weight = host.weight.detach().double()
    wt = weight.T.clone() if linear else weight.clone()  # (in, F); Conv1D stores (in, F)
    b = host.bias.detach().double().clone() if host.bias is not None else None
    for s in seeds:
        m, c = _AFFINE[s.spec.kind](s.params, s.end - s.start)
        eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        m = (1.0 - s.alpha) * eye + s.alpha * m  # (w, w)
        wt[:, s.start:s.end] = wt[:, s.start:s.end] @ m
        if c is not None and b is None:  # a bias-free host gains the blueprint's bias
            b = torch.zeros(wt.shape[1], dtype=wt.dtype, device=wt.device)
        if b is not None:
            b[s.start:s.end] = b[s.start:s.end] @ m + (0.0 if c is None else s.alpha * c)
    dtype, grad = host.weight.dtype, host.weight.requires_grad
    new_weight = wt.T if linear else wt
    host.weight = nn.Parameter(new_weight.contiguous().to(host.weight.device, dtype), grad)
    if b is not None:
        host.bias = nn.Parameter(b.to(host.weight.device, dtype), grad)


def _residual_layer(host: nn.Module, layer: KasminaLayer, seeds: list[_GrownSeed]
                    ) -> fx.GraphModule:
    """h = the host's affine map, the host's weight and bias as this module's own `weight` and
    `bias` (code that reads `layer.weight.dtype` keeps working); then each seed's chunk of h
    through its residual module, blended at its alpha as the grown layer's forward does:
    y = x + bp(x), out = (1 - a) x + a y, x the chunk in the module's dtype."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    root: dict[str, object] = {"weight": host.weight}
    weight = graph.get_attr("weight")
    if not isinstance(host, nn.Linear):  # Conv1D: x @ weight, weight (in, F)
        weight = graph.call_method("t", (weight,))
    bias = None
    if host.bias is not None:
        root["bias"] = host.bias
        bias = graph.get_attr("bias")
    h = graph.call_function(F.linear, (x, weight, bias))  # (..., F)
    narrow = lambda start, end: graph.call_function(  # noqa: E731
        torch.narrow, (h, -1, start, end - start))
    pieces, pos = [], 0
    for s in sorted(seeds, key=lambda s: s.start):
        name = f"seed{s.seed}"
        module = _RESIDUAL[s.spec.kind]({n: p.float() for n, p in s.params.items()}, s.spec)
        first, param = next(module.named_parameters())  # whose dtype the chunk takes
        root[name], root[f"{name}.{first}"] = module, param
        if s.start > pos:
            pieces.append(narrow(pos, s.start))
        hc = narrow(s.start, s.end)  # (..., w)
        xc = graph.call_method("type_as", (hc, graph.get_attr(f"{name}.{first}")))
        y = graph.call_function(operator.add, (xc, graph.call_module(name, (xc,))))
        if s.alpha != 1.0:  # at alpha 1 the blend is y exactly
            y = graph.call_function(operator.add, (
                graph.call_function(operator.mul, (xc, 1.0 - s.alpha)),
                graph.call_function(operator.mul, (y, s.alpha))))
        pieces.append(graph.call_method("type_as", (y, hc)))
        pos = s.end
    if pos < layer.out_features:
        pieces.append(narrow(pos, layer.out_features))
    graph.output(graph.call_function(torch.cat, (pieces, -1)))
    module = fx.GraphModule(root, graph, class_name="SeedResidualLinear")
    if host.bias is None:
        module.register_parameter("bias", None)
    module.in_features, module.out_features = layer.in_features, layer.out_features
    return module


def _keep_fused_paths_off(model: nn.Module) -> None:
    """TransformerEncoderLayer's fused inference path (eval, no grad) reads linear1's and
    linear2's weights and skips their forward, so it would drop a residual seed. The seed layer
    turns it off with a hook; an fx module drops its hooks when pickled, so here it is the flag
    that path checks, on every block where a residual module sits (its slow path reads the
    same `activation`)."""
    for block in model.modules():
        if isinstance(block, nn.TransformerEncoderLayer) and any(
                isinstance(getattr(block, name), fx.GraphModule)
                for name in ("linear1", "linear2")):
            block.activation_relu_or_gelu = 0


__all__ = ["SeedLayerSummary", "Summary", "export", "summary"]
