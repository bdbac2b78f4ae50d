"""The blueprint catalog (DESIGN §6): what each blueprint costs and which chunk sizes it fits.

The built-in entries are the wire contracts' (oona's blueprint_catalog.txtpb, the one Kasmina
reads too), with parameter costs derived from each kind's shapes; Karn keeps them in its
database, upserted at every start, beside the blueprints its search proposes.
"""

from __future__ import annotations

from oona.contracts import BlueprintSpec, catalog


def parameter_count(spec: BlueprintSpec, chunk_size: int) -> int:
    """Parameters one seed of this blueprint adds on a chunk of `chunk_size` features."""
    cost = spec.parameter_cost
    return cost.per_chunk_squared * chunk_size**2 + cost.per_chunk * chunk_size + cost.constant


def fits(spec: BlueprintSpec, chunk_size: int) -> bool:
    """Whether the blueprint can be built on a chunk of `chunk_size` features."""
    return chunk_size >= max(spec.min_chunk_size, 1) and (
        spec.max_chunk_size == 0 or chunk_size <= spec.max_chunk_size)


def builtin_catalog() -> list[BlueprintSpec]:
    """The contracts' built-in catalog, by id, costs filled in."""
    return catalog()
