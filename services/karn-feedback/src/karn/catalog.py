"""The blueprint catalog (DESIGN §6): what each blueprint costs and which chunk sizes it fits.

Karn owns the catalog; it lives in the database and is seeded with the built-in entries below,
which match `kasmina.blueprints` (same names, ids and sizes), so a job that builds modules from
Karn's specs gets the same seeds as one using kasmina's built-in catalog.
"""

from __future__ import annotations

from oona.contracts import BlueprintKind, BlueprintSpec, ParameterCost


def parameter_count(spec: BlueprintSpec, chunk_size: int) -> int:
    """Parameters one seed of this blueprint adds on a chunk of `chunk_size` features."""
    cost = spec.parameter_cost
    return cost.per_chunk_squared * chunk_size**2 + cost.per_chunk * chunk_size + cost.constant


def fits(spec: BlueprintSpec, chunk_size: int) -> bool:
    """Whether the blueprint can be built on a chunk of `chunk_size` features."""
    return chunk_size >= max(spec.min_chunk_size, 1) and (
        spec.max_chunk_size == 0 or chunk_size <= spec.max_chunk_size)


def residual_mlp(blueprint_id: int, hidden: int) -> BlueprintSpec:
    # w1 (c, h) + b1 (h) + w2 (h, c) + b2 (c) = (2h + 1) c + h
    return BlueprintSpec(
        name="residual_mlp", kind=BlueprintKind.BLUEPRINT_KIND_RESIDUAL_MLP,
        blueprint_id=blueprint_id, hidden=hidden, min_chunk_size=1,
        parameter_cost=ParameterCost(per_chunk=2 * hidden + 1, constant=hidden),
        description=f"x + W2 gelu(W1 x + b1) + b2, hidden width {hidden}")


def low_rank(blueprint_id: int, rank: int, min_chunk_size: int) -> BlueprintSpec:
    # a (c, r) + b (r, c) = 2r c
    return BlueprintSpec(
        name="low_rank", kind=BlueprintKind.BLUEPRINT_KIND_LOW_RANK,
        blueprint_id=blueprint_id, rank=rank, min_chunk_size=min_chunk_size,
        parameter_cost=ParameterCost(per_chunk=2 * rank),
        description=f"x + B A x, rank {rank}")


def linear(blueprint_id: int, max_chunk_size: int) -> BlueprintSpec:
    # w (c, c) + b (c) = c^2 + c
    return BlueprintSpec(
        name="linear", kind=BlueprintKind.BLUEPRINT_KIND_LINEAR,
        blueprint_id=blueprint_id, min_chunk_size=1, max_chunk_size=max_chunk_size,
        parameter_cost=ParameterCost(per_chunk_squared=1, per_chunk=1),
        description="W x + b over the chunk")


def builtin_catalog() -> list[BlueprintSpec]:
    """kasmina's built-in catalog: residual_mlp=1 (hidden 16), low_rank=2 (rank 4, chunks of at
    least 5), linear=3 (chunks of at most 256: a dense map costs chunk² parameters)."""
    return [residual_mlp(1, hidden=16), low_rank(2, rank=4, min_chunk_size=5),
            linear(3, max_chunk_size=256)]
