"""Blueprint catalog: `BlueprintSpec` (data) and the batched maths of each kind (DESIGN §3.2, §6).

A spec is plain data with a stable numeric `id`, so checkpoints and the wire name blueprints the
same way in every process. Each *kind* knows its parameter shapes for a chunk width, how to
initialise one seed's parameters, and how to run many seeds at once: every function here takes
parameters with a leading seed dimension `A` and inputs `(A, N, C)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .lifecycle import UnknownBlueprintError


@dataclass(frozen=True)
class BlueprintSpec:
    name: str
    kind: str  # one of KINDS
    id: int  # stable across processes; >= 1 (0 is "unspecified" on the wire)
    hidden: int = 0  # residual_mlp: width of the hidden layer
    rank: int = 0  # low_rank: rank of the update
    min_chunk: int = 1
    max_chunk: int = 0  # 0: no upper bound

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown blueprint kind {self.kind!r}; known: {sorted(KINDS)}")
        if self.id < 1:
            raise ValueError(f"blueprint id must be >= 1, got {self.id}")

    def fits(self, chunk_size: int) -> bool:
        return chunk_size >= self.min_chunk and (self.max_chunk == 0 or
                                                  chunk_size <= self.max_chunk)

    def shapes(self, chunk: int) -> dict[str, tuple[int, ...]]:
        return KINDS[self.kind].shapes(self, chunk)

    def param_count(self, chunk_size: int) -> int:
        return sum(math.prod(s) for s in self.shapes(chunk_size).values())


@dataclass(frozen=True)
class BlueprintKind:
    shapes: Callable[[BlueprintSpec, int], dict[str, tuple[int, ...]]]
    # fan-in per parameter, for uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) initialisation
    fan_in: Callable[[BlueprintSpec, int], dict[str, int]]
    # (params with leading dim A, x (A, N, C)) -> y (A, N, C)
    forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def _residual_mlp(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    z = F.gelu(torch.baddbmm(p["b1"].unsqueeze(1), x, p["w1"]))  # (A, N, H)
    return x + torch.baddbmm(p["b2"].unsqueeze(1), z, p["w2"])  # (A, N, C)


def _low_rank(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x + torch.bmm(torch.bmm(x, p["a"]), p["b"])  # (A, N, R) -> (A, N, C)


def _linear(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(p["b"].unsqueeze(1), x, p["w"])  # (A, N, C)


KINDS: dict[str, BlueprintKind] = {
    "residual_mlp": BlueprintKind(
        shapes=lambda s, c: {"w1": (c, s.hidden), "b1": (s.hidden,), "w2": (s.hidden, c),
                             "b2": (c,)},
        fan_in=lambda s, c: {"w1": c, "b1": c, "w2": s.hidden, "b2": s.hidden},
        forward=_residual_mlp),
    "low_rank": BlueprintKind(
        shapes=lambda s, c: {"a": (c, s.rank), "b": (s.rank, c)},
        fan_in=lambda s, c: {"a": c, "b": s.rank},
        forward=_low_rank),
    "linear": BlueprintKind(
        shapes=lambda s, c: {"w": (c, c), "b": (c,)},
        fan_in=lambda s, c: {"w": c, "b": c},
        forward=_linear),
}

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


register_blueprint(BlueprintSpec("residual_mlp", "residual_mlp", 1, hidden=16))
register_blueprint(BlueprintSpec("low_rank", "low_rank", 2, rank=4, min_chunk=5))
# A dense map costs chunk² parameters: bounded to chunks of at most 256 features.
register_blueprint(BlueprintSpec("linear", "linear", 3, max_chunk=256))
