"""The blueprint catalog as data in the contracts: costs derived from shapes, specs checked."""

from __future__ import annotations

import math
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from oona.contracts import (
    CATALOG_FILE,
    MAX_BLUEPRINT_SIZE,
    BlueprintActivation,
    BlueprintKind,
    BlueprintSpec,
    BlueprintSpecError,
    ParameterCost,
    UnknownBlueprintKindError,
    catalog,
    check_spec,
    kind_from_name,
    kind_name,
    parameter_cost,
    parameter_shapes,
    with_cost,
)

K = BlueprintKind


def test_builtin_catalog_keeps_its_stable_ids_names_and_sizes():
    got = [(s.blueprint_id, s.name, kind_name(s.kind), s.hidden, s.rank, s.min_chunk_size,
            s.max_chunk_size) for s in catalog()]
    assert got == [(1, "residual_mlp", "residual_mlp", 16, 0, 1, 0),
                   (2, "low_rank", "low_rank", 0, 4, 5, 0),
                   (3, "linear", "linear", 0, 0, 1, 256)]


def test_costs_are_the_shapes_counted_written_out_per_kind():
    # The formulas of DESIGN §6's kinds, written out by hand only here, to check the derivation.
    by_name = {s.name: s.parameter_cost for s in catalog()}
    assert by_name["residual_mlp"] == ParameterCost(per_chunk=2 * 16 + 1, constant=16)
    assert by_name["low_rank"] == ParameterCost(per_chunk=2 * 4)
    assert by_name["linear"] == ParameterCost(per_chunk_squared=1, per_chunk=1)


@given(kind=st.sampled_from([K.BLUEPRINT_KIND_RESIDUAL_MLP, K.BLUEPRINT_KIND_LOW_RANK,
                             K.BLUEPRINT_KIND_LINEAR]),
       size=st.integers(1, 512), chunk=st.integers(1, 4096))
def test_derived_cost_equals_the_parameter_count_at_every_chunk_width(kind, size, chunk):
    spec = BlueprintSpec(name="t", kind=kind, blueprint_id=9)
    if kind == K.BLUEPRINT_KIND_RESIDUAL_MLP:
        spec.hidden = size
    elif kind == K.BLUEPRINT_KIND_LOW_RANK:
        spec.rank = size
    cost = parameter_cost(spec)
    counted = sum(math.prod(s) for s in parameter_shapes(spec, chunk).values())
    assert cost.per_chunk_squared * chunk**2 + cost.per_chunk * chunk + cost.constant == counted


def test_with_cost_replaces_a_wrong_cost_and_leaves_the_input_alone():
    spec = BlueprintSpec(name="wide", kind=K.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=7,
                         hidden=64, parameter_cost=ParameterCost(constant=1))
    fixed = with_cost(spec)
    assert fixed.parameter_cost == ParameterCost(per_chunk=129, constant=64)
    assert spec.parameter_cost == ParameterCost(constant=1)


@pytest.mark.parametrize(("spec", "error", "words"), [
    (BlueprintSpec(name="x", kind=99, blueprint_id=5), UnknownBlueprintKindError, "unknown kind"),
    (BlueprintSpec(name="x", kind=K.BLUEPRINT_KIND_UNSPECIFIED, blueprint_id=5),
     UnknownBlueprintKindError, "unknown kind"),
    (BlueprintSpec(name="x", kind=K.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=5),
     BlueprintSpecError, "needs hidden"),
    (BlueprintSpec(name="x", kind=K.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=5,
                   hidden=MAX_BLUEPRINT_SIZE + 1), BlueprintSpecError, "needs hidden"),
    (BlueprintSpec(name="x", kind=K.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=5, hidden=8,
                   rank=2), BlueprintSpecError, "has no rank"),
    (BlueprintSpec(name="x", kind=K.BLUEPRINT_KIND_LOW_RANK, blueprint_id=5, rank=2,
                   activation=BlueprintActivation.BLUEPRINT_ACTIVATION_RELU),
     BlueprintSpecError, "has no activation"),
    (BlueprintSpec(name="x", kind=K.BLUEPRINT_KIND_RESIDUAL_MLP, blueprint_id=5, hidden=8,
                   activation=42), BlueprintSpecError, "BlueprintActivation"),
    (BlueprintSpec(name="x", kind=K.BLUEPRINT_KIND_LINEAR, blueprint_id=0), BlueprintSpecError,
     "blueprint_id >= 1"),
    (BlueprintSpec(name="x", kind=K.BLUEPRINT_KIND_LINEAR, blueprint_id=5, min_chunk_size=8,
                   max_chunk_size=4), BlueprintSpecError, "below min_chunk_size"),
    (BlueprintSpec(name="x", kind=K.BLUEPRINT_KIND_LINEAR, blueprint_id=5,
                   seed_learning_rate=float("nan")), BlueprintSpecError, "seed_learning_rate"),
])
def test_a_spec_no_service_can_build_is_refused_with_its_reason(spec, error, words):
    with pytest.raises(error, match=words):
        check_spec(spec)


def test_kind_names_are_the_wire_enum_names():
    for kind in (K.BLUEPRINT_KIND_RESIDUAL_MLP, K.BLUEPRINT_KIND_LOW_RANK,
                 K.BLUEPRINT_KIND_LINEAR):
        assert kind_from_name(kind_name(kind)) == kind
        assert BlueprintKind.Name(kind) == "BLUEPRINT_KIND_" + kind_name(kind).upper()
    for bad in ("unspecified", "RESIDUAL_MLP", "conv"):
        with pytest.raises(UnknownBlueprintKindError):
            kind_from_name(bad)


def test_the_catalog_file_is_package_data():
    assert resources.files("oona").joinpath(CATALOG_FILE).is_file()
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["oona"]
    assert CATALOG_FILE in data
