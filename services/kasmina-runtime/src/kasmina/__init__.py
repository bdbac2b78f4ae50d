"""Kasmina: chunked seed layers that grow capacity while a network trains."""

from .blueprints import BlueprintSpec, catalog, get_blueprint, register_blueprint
from .config import KasminaConfig
from .controller import ControllerConfig, LocalController
from .events import LifecycleEvent, SeedOutcome
from .layer import KasminaLayer, split_chunks
from .lifecycle import (
    BlueprintDoesNotFitError,
    CapacityError,
    EmbargoError,
    GateNotPassedError,
    InvalidTransitionError,
    LifecycleError,
    SeedStage,
    UnknownBlueprintError,
    UnknownSeedError,
    UnknownStrategyError,
)
from .strategies import GraftContext, GraftingStrategy, get_strategy, register_strategy
from .telemetry import LayerHealthReport, SeedHealth
from .wrap import check_unique_ids, host_parameters, name_layers, seed_layers, wrap

__all__ = [
    "BlueprintDoesNotFitError", "BlueprintSpec", "CapacityError", "ControllerConfig",
    "EmbargoError", "GateNotPassedError", "GraftContext", "GraftingStrategy",
    "InvalidTransitionError", "KasminaConfig", "KasminaLayer", "LayerHealthReport",
    "LifecycleError", "LifecycleEvent", "LocalController", "SeedHealth", "SeedOutcome",
    "SeedStage", "UnknownBlueprintError", "UnknownSeedError", "UnknownStrategyError", "catalog",
    "check_unique_ids", "get_blueprint", "get_strategy", "host_parameters", "name_layers",
    "register_blueprint", "register_strategy", "seed_layers", "split_chunks", "wrap",
]


def __getattr__(name: str) -> object:
    # The fleet bridge needs the bus library (oona); library use without a fleet does not.
    if name in ("attach", "FleetRuntime"):
        from . import fleet
        return getattr(fleet, name)
    raise AttributeError(f"module 'kasmina' has no attribute {name!r}")
