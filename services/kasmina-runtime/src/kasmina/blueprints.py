"""Blueprints: `BlueprintSpec` (data) and the batched maths of each kind (DESIGN §3.2, §6).

The catalog is data in the wire contracts (oona's blueprint_catalog.txtpb), defined once: the
built-in specs and every kind's parameters are read here from `blueprint_catalog.json`, the copy
`python -m oona.codegen` writes into this package, with the standard library (the core needs
only torch and numpy). What lives here is the maths: each kind's forward pass over many seeds at
once (parameters with a leading seed dimension `A`, inputs `(A, N, C)`). A spec received on the
wire (`resolve_wire_spec`, the fleet's side: it imports oona) is checked and built like a
built-in one: a new kind is its maths below plus its entry in the catalog file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lifecycle import BlueprintDoesNotFitError, LifecycleError, UnknownBlueprintError

Params = dict[str, torch.Tensor]
Activation = Callable[[torch.Tensor], torch.Tensor]
CATALOG_JSON = "blueprint_catalog.json"

# The wire's BlueprintActivation values by their library names ("" is the kind's default, gelu).
# Each maps 0 to 0: a bank's hidden units past a spec's width stay exactly 0 (`init_bounds`).
ACTIVATIONS: dict[str, Activation] = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh,
                                      "silu": F.silu}
DEFAULT_ACTIVATION = "gelu"
INITS = ("fan_in_uniform", "zero_output")  # the wire's BlueprintInit values ("": fan_in_uniform)


@functools.lru_cache(maxsize=256)
def _row_splits(n: int, seeds: int) -> int:
    """How many row blocks a weight gradient's reduction over n rows is split into: enough
    (seeds x splits) GEMMs to fill a GPU (~1,024), blocks of at least 256 rows, a divisor of
    n (so the blocks are views). Cached: every backward of every bank asks, for a few shapes."""
    for s in range(max(1, min(n // 256, -(-1024 // max(seeds, 1)))), 1, -1):
        if n % s == 0:
            return s
    return 1


class _RowsMatmul(torch.autograd.Function):
    """x @ w (+ b) for x (A, N, K), w (A, K, M), b (A, M) or None, N rows far more than K and
    M: torch.bmm / baddbmm forward; in the backward w's gradient x^T g, a reduction over the N
    rows into a (K, M) output a seed, runs as (A x splits) GEMMs over row blocks, summed.
    cuBLAS ran it as one GEMM a seed (fp32, 32 x 32 tiles: a few thread blocks on the whole
    GPU): 1.05 ms each, half the GPU time of a growing step at 2048 x 32768 with 6 seeds of 32
    features on an H200 (benchmarks/NOTES.md, s13; since s14 those GELU residual_mlp banks run
    the fused tiles, and this serves the other kinds and banks past 64 features). The GEMMs run
    in g's dtype (bf16 under autocast, as autocast's own bmm backward would); the blocks'
    partials add in float32."""

    @staticmethod
    def forward(ctx, x, w, b):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None
        return torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x, w, g = x.to(g.dtype), w.to(g.dtype), g.contiguous()
        gx = g.bmm(w.transpose(1, 2)) if needs[0] else None
        gw = None
        if needs[1]:
            (a, n, k), m = x.shape, g.shape[2]
            # (traced, the uncached function: dynamo warns on an lru_cache it traces through)
            s = (_row_splits.__wrapped__ if torch.compiler.is_compiling() else _row_splits)(n, a)
            xs = x.reshape(a * s, n // s, k)  # (a copy where x's layout has no such view)
            gw = xs.transpose(1, 2).bmm(g.reshape(a * s, n // s, m)).view(a, s, k, m).sum(
                1, dtype=torch.promote_types(g.dtype, torch.float32))  # (bf16 partials: fp32)
        gb = g.sum(1) if ctx.bias and needs[2] else None
        return gx, gw, gb


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The blueprints' batched matmul: `_RowsMatmul` on CUDA, torch's own elsewhere (the CPU's
    results stay those of earlier releases, bit for bit)."""
    if x.is_cuda:
        return _RowsMatmul.apply(x, w, b)
    return torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)


def _residual_mlp(p: Params, x: torch.Tensor, act: Activation) -> torch.Tensor:
    z = act(_mm(x, p["w1"], p["b1"]))  # (A, N, H)
    return x + _mm(z, p["w2"], p["b2"])  # (A, N, C)


def _low_rank(p: Params, x: torch.Tensor, act: Activation) -> torch.Tensor:
    return x + _mm(_mm(x, p["a"]), p["b"])  # (A, N, R) -> (A, N, C)


def _linear(p: Params, x: torch.Tensor, act: Activation) -> torch.Tensor:
    return _mm(x, p["w"], p["b"])  # (A, N, C)


# The maths of each kind, by the catalog's kind name; its parameter names are the catalog's.
_MATHS: dict[str, Callable[[Params, torch.Tensor, Activation], torch.Tensor]] = {
    "residual_mlp": _residual_mlp, "low_rank": _low_rank, "linear": _linear}


def _enum(value: str, prefix: str) -> str:
    """"BLUEPRINT_KIND_LOW_RANK" (json_format's enum name) -> "low_rank"."""
    assert value.startswith(prefix), (value, prefix)
    return value.removeprefix(prefix).lower()


@dataclass(frozen=True)
class BlueprintParameter:
    name: str
    shape: tuple[str, ...]  # each dimension a size: "chunk", "hidden" or "rank"
    fan_in: str  # the size that is its fan-in
    output: bool  # starts at 0 under the zero_output init


@dataclass(frozen=True)
class BlueprintKind:
    """A kind's parameters (from the catalog) and its maths (from `_MATHS`)."""

    parameters: tuple[BlueprintParameter, ...]
    activation: bool  # whether the maths applies the spec's activation
    maths: Callable[[Params, torch.Tensor, Activation], torch.Tensor]

    @property
    def sizes(self) -> set[str]:
        """The spec sizes its shapes use, besides the chunk."""
        return {d for p in self.parameters for d in p.shape} - {"chunk"}

    def shapes(self, spec: BlueprintSpec, chunk: int) -> dict[str, tuple[int, ...]]:
        sizes = _sizes(spec, chunk)
        return {p.name: tuple(sizes[d] for d in p.shape) for p in self.parameters}

    def fan_in(self, spec: BlueprintSpec, chunk: int) -> dict[str, float]:
        """Fan-in per parameter, for uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) initialisation. An
        output parameter of a zero_output spec has an infinite fan-in: a bound of exactly 0."""
        sizes = _sizes(spec, chunk)
        return {p.name: math.inf if p.output and spec.init == "zero_output" else sizes[p.fan_in]
                for p in self.parameters}


def _sizes(spec: BlueprintSpec, chunk: int) -> dict[str, int]:
    return {"chunk": chunk, "hidden": spec.hidden, "rank": spec.rank}


def _read_catalog() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath(CATALOG_JSON).read_text("utf-8"))


def _kinds(data: dict[str, Any]) -> dict[str, BlueprintKind]:
    kinds = {}
    for k in data["kinds"]:
        name = _enum(k["kind"], "BLUEPRINT_KIND_")
        assert name in _MATHS, f"{CATALOG_JSON}: kind {name!r} has no maths in {__name__}"
        params = tuple(BlueprintParameter(
            p["name"], tuple(_enum(d, "BLUEPRINT_DIM_") for d in p["shape"]),
            _enum(p["fan_in"], "BLUEPRINT_DIM_"), p.get("output", False)) for p in k["parameters"])
        kinds[name] = BlueprintKind(params, k.get("activation", False), _MATHS[name])
    return kinds


_DATA = _read_catalog()
KINDS: dict[str, BlueprintKind] = _kinds(_DATA)


@dataclass(frozen=True)
class BlueprintSpec:
    name: str
    kind: str  # one of KINDS: the wire BlueprintKind's name, lower case
    id: int  # stable across processes; >= 1 (0 is "unspecified" on the wire)
    hidden: int = 0  # residual_mlp: width of the hidden layer
    rank: int = 0  # low_rank: rank of the update
    min_chunk: int = 1
    max_chunk: int = 0  # 0: no upper bound
    activation: str = ""  # kinds with one: a key of ACTIVATIONS; "": DEFAULT_ACTIVATION
    init: str = ""  # one of INITS; "": fan_in_uniform
    # Per seed grown from this spec (the layer's lanes carry them): its grafting ramp length,
    # 0: the layer's KasminaConfig.ramp_steps; its optimiser's rate, 0: KasminaConfig.seed_lr.
    ramp_steps: int = 0
    seed_lr: float = 0.0
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        kind = KINDS.get(self.kind)
        if kind is None:
            raise UnknownBlueprintError(f"unknown blueprint kind {self.kind!r}; known: "
                                        f"{sorted(KINDS)}")
        label = f"blueprint {self.name!r} (id {self.id})"
        if not self.name or self.id < 1:
            raise LifecycleError(f"{label}: needs a name and an id >= 1")
        for size in ("hidden", "rank"):
            value, used = getattr(self, size), size in kind.sizes
            if (value < 1) if used else value != 0:
                raise LifecycleError(f"{label}: kind {self.kind} "
                                     f"{'needs' if used else 'has no'} {size}, got {value}")
        if self.activation and (not kind.activation or self.activation not in ACTIVATIONS):
            raise LifecycleError(f"{label}: activation {self.activation!r} is not one of kind "
                                 f"{self.kind}'s: {sorted(ACTIVATIONS) if kind.activation else []}")
        if self.init and self.init not in INITS:
            raise LifecycleError(f"{label}: unknown init {self.init!r}; known: {INITS}")
        if self.max_chunk and self.max_chunk < self.min_chunk:
            raise LifecycleError(f"{label}: max_chunk {self.max_chunk} is below min_chunk "
                                 f"{self.min_chunk}")

    def fits(self, chunk_size: int) -> bool:
        return chunk_size >= self.min_chunk and (self.max_chunk == 0 or
                                                  chunk_size <= self.max_chunk)

    def shapes(self, chunk: int) -> dict[str, tuple[int, ...]]:
        return KINDS[self.kind].shapes(self, chunk)

    def param_count(self, chunk_size: int) -> int:
        """Parameters one seed adds: the sum of its shapes, as oona.contracts.parameter_cost
        derives the wire's cost (a test holds the two equal over the catalog)."""
        return sum(math.prod(s) for s in self.shapes(chunk_size).values())

    def to_wire(self) -> Any:
        """The spec as the contracts carry it (an oona.contracts.BlueprintSpec, its parameter
        cost filled in). Needs the fleet extra."""
        from oona import contracts as wire

        def value(enum: Any, prefix: str, name: str) -> int:
            return enum.Value(prefix + name.upper()) if name else 0

        return wire.with_cost(wire.BlueprintSpec(
            name=self.name, kind=wire.kind_from_name(self.kind), blueprint_id=self.id,
            hidden=self.hidden, rank=self.rank, min_chunk_size=self.min_chunk,
            max_chunk_size=self.max_chunk, description=self.description,
            activation=value(wire.BlueprintActivation, "BLUEPRINT_ACTIVATION_", self.activation),
            init=value(wire.BlueprintInit, "BLUEPRINT_INIT_", self.init),
            ramp_steps=self.ramp_steps, seed_learning_rate=self.seed_lr))


def _spec_from_catalog(d: dict[str, Any]) -> BlueprintSpec:
    """A catalog entry (json_format's dict of a wire BlueprintSpec) as a spec."""
    return BlueprintSpec(
        name=d["name"], kind=_enum(d["kind"], "BLUEPRINT_KIND_"), id=d["blueprint_id"],
        hidden=d.get("hidden", 0), rank=d.get("rank", 0),
        min_chunk=max(d.get("min_chunk_size", 1), 1), max_chunk=d.get("max_chunk_size", 0),
        activation=_enum(d["activation"], "BLUEPRINT_ACTIVATION_") if "activation" in d else "",
        init=_enum(d["init"], "BLUEPRINT_INIT_") if "init" in d else "",
        ramp_steps=d.get("ramp_steps", 0), seed_lr=d.get("seed_learning_rate", 0.0),
        description=d.get("description", ""))


def forward_of(spec: BlueprintSpec) -> Callable[[Params, torch.Tensor], torch.Tensor]:
    """The batched forward of `spec`'s kind with `spec`'s activation (a partial, not a lambda:
    a bank holding it pickles with the model)."""
    return functools.partial(KINDS[spec.kind].maths,
                             act=ACTIVATIONS[spec.activation or DEFAULT_ACTIVATION])


def uses_fused_mlp(spec: BlueprintSpec, chunk: int) -> bool:
    """Whether a bank of `spec` on chunks of `chunk` runs the fused residual_mlp
    (kernels/triton_mlp.py): residual_mlp with the GELU those kernels compute, at the sizes
    `kernels.fused_mlp_fits` takes (unrolled columns up to 8 features, tiles to 64)."""
    from . import kernels

    return (spec.kind == "residual_mlp" and (spec.activation or DEFAULT_ACTIVATION) == "gelu"
            and kernels.fused_mlp_fits(chunk, spec.hidden))


def fits_bank(spec: BlueprintSpec, bank: BlueprintSpec) -> bool:
    """Whether seeds of `spec` can live in a bank shaped by `bank`: same kind and activation,
    sizes no larger. The bank's extra hidden units (or rank) start at 0 and stay there: with
    zero inputs to them and zero weights out, every activation here gives 0 and a 0 gradient."""
    return (spec.kind == bank.kind and (spec.activation or DEFAULT_ACTIVATION)
            == (bank.activation or DEFAULT_ACTIVATION)
            and spec.hidden <= bank.hidden and spec.rank <= bank.rank)


def with_headroom(spec: BlueprintSpec, hidden: int, rank: int) -> BlueprintSpec:
    """The shape of a bank for `spec` that also takes specs of its kind up to `hidden` / `rank`
    wide (a size the kind does not have stays 0)."""
    return dataclasses.replace(spec, hidden=max(spec.hidden, hidden) if spec.hidden else 0,
                               rank=max(spec.rank, rank) if spec.rank else 0)


def init_bounds(bank: BlueprintSpec, spec: BlueprintSpec, chunk: int) -> torch.Tensor:
    """(P,) uniform(-b, b) bound of each parameter of a slot of `bank` holding a seed of `spec`
    (`fits_bank`), in the bank's flat layout: `spec`'s fan-in bounds inside `spec`'s shapes,
    0 in the rest of the bank's, so the slot computes exactly what `spec` alone would."""
    fan_in, mine = KINDS[spec.kind].fan_in(spec, chunk), spec.shapes(chunk)
    parts = []
    for name, shape in bank.shapes(chunk).items():
        bound = torch.zeros(shape)
        bound[tuple(map(slice, mine[name]))] = 1.0 / math.sqrt(fan_in[name])
        parts.append(bound.flatten())
    return torch.cat(parts)


class BlueprintModule(nn.Module):
    """One seed's blueprint as a plain module over a chunk: `spec`'s parameters at their
    shapes, initialised by `spec.init` from a generator seeded with `seed` (the same draw a
    bank slot makes), and its kind's maths. x (..., C) -> (..., C)."""

    def __init__(self, spec: BlueprintSpec, chunk: int, seed: int = 0) -> None:
        super().__init__()
        if not spec.fits(chunk):
            raise BlueprintDoesNotFitError(
                f"blueprint {spec.name!r} does not fit a chunk of {chunk} features")
        self.spec, self.chunk = spec, chunk
        shapes = spec.shapes(chunk)
        gen = torch.Generator().manual_seed(seed)
        flat = (torch.rand(sum(map(math.prod, shapes.values())), generator=gen) * 2 - 1
                ) * init_bounds(spec, spec, chunk)
        self.params = nn.ParameterDict()
        start = 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            self.params[name] = nn.Parameter(flat[start:start + size].view(shape).clone())
            start += size
        self._forward = forward_of(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward({n: p.unsqueeze(0) for n, p in self.params.items()},
                          x.reshape(1, -1, self.chunk))  # (1, N, C)
        return y.view_as(x)


def build_module(spec: Any, chunk: int, seed: int = 0) -> BlueprintModule:
    """A module for any valid spec: a `BlueprintSpec`, or a wire one (oona.contracts
    .BlueprintSpec, checked by `from_wire`). Refusals are `LifecycleError`s."""
    return BlueprintModule(spec if isinstance(spec, BlueprintSpec) else from_wire(spec),
                           chunk, seed)


def from_wire(message: Any) -> BlueprintSpec:
    """A spec from the wire (an oona.contracts.BlueprintSpec), checked by the contracts: an
    unknown kind is an `UnknownBlueprintError`, sizes or fields no kind can build a
    `LifecycleError` (code "invalid"). The parameter cost the message carries is ignored: it is
    derived from the shapes. Needs the fleet extra."""
    from oona import contracts as wire

    try:
        wire.check_spec(message)
    except wire.UnknownBlueprintKindError as err:
        raise UnknownBlueprintError(str(err)) from None
    except wire.BlueprintSpecError as err:
        raise LifecycleError(str(err)) from None
    kind = wire.kind_name(message.kind)
    if kind not in KINDS:  # defined by a newer contract than this runtime's catalog
        raise UnknownBlueprintError(f"blueprint {message.name!r}: this runtime has no kind "
                                    f"{kind!r}; known: {sorted(KINDS)}")

    def name(enum: Any, prefix: str, value: int) -> str:
        return _enum(enum.Name(value), prefix) if value else ""

    return BlueprintSpec(
        name=message.name, kind=kind, id=message.blueprint_id, hidden=message.hidden,
        rank=message.rank, min_chunk=max(message.min_chunk_size, 1),
        max_chunk=message.max_chunk_size,
        activation=name(wire.BlueprintActivation, "BLUEPRINT_ACTIVATION_", message.activation),
        init=name(wire.BlueprintInit, "BLUEPRINT_INIT_", message.init),
        ramp_steps=message.ramp_steps, seed_lr=message.seed_learning_rate,
        description=message.description)


def resolve_wire_spec(message: Any) -> BlueprintSpec:
    """The spec a Germinate carries, checked and registered (so its id names it in this
    process from now on). A spec whose id or name is already another spec here is refused
    (`LifecycleError`, code "invalid"). Needs the fleet extra."""
    spec = from_wire(message)
    try:
        return register_blueprint(spec)
    except LifecycleError:
        raise
    except ValueError as err:
        raise LifecycleError(str(err)) from None


_CATALOG: dict[str, BlueprintSpec] = {}
_BY_ID: dict[int, BlueprintSpec] = {}


def register_blueprint(spec: BlueprintSpec) -> BlueprintSpec:
    """Add a spec to the catalog. Re-registering an identical spec is a no-op."""
    for existing in (_CATALOG.get(spec.name), _BY_ID.get(spec.id)):
        if existing is not None and existing != spec:
            raise ValueError(f"blueprint {spec.name!r}/id {spec.id} conflicts with {existing}")
    _CATALOG[spec.name] = _BY_ID[spec.id] = spec
    return spec


def get_blueprint(key: str | int | BlueprintSpec) -> BlueprintSpec:
    if isinstance(key, BlueprintSpec):
        return register_blueprint(key)
    found = _BY_ID.get(key) if isinstance(key, int) else _CATALOG.get(key)
    if found is None:
        raise UnknownBlueprintError(f"unknown blueprint {key!r}; catalog: {sorted(_CATALOG)}")
    return found


def catalog() -> list[BlueprintSpec]:
    return sorted(_CATALOG.values(), key=lambda s: s.id)


# The catalog's own specs, which every process registers here at import.
BUILT_IN_IDS = frozenset(register_blueprint(_spec_from_catalog(d)).id for d in _DATA["blueprints"])
