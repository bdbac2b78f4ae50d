"""Kasmina: chunked seed layers that grow capacity while a network trains."""

from .blueprints import BlueprintSpec, catalog, get_blueprint, register_blueprint
from .config import KasminaConfig
from .controller import ControllerConfig, LocalController
from .distributed import prepare_ddp
from .dual import DualPathLayer
from .events import LifecycleEvent, SeedOutcome
from .export import SeedLayerSummary, Summary, export, summary
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
from .protocol import SeedLayer
from .strategies import GraftContext, GraftingStrategy, get_strategy, register_strategy
from .telemetry import LayerHealthReport, SeedHealth
from .wrap import check_unique_ids, host_parameters, name_layers, seed_layers, wrap

__all__ = [
    "DualPathLayer",
    "BlueprintDoesNotFitError", "BlueprintSpec", "CapacityError", "ControllerConfig",
    "EmbargoError", "GateNotPassedError", "GraftContext", "GraftingStrategy",
    "InvalidTransitionError", "KasminaConfig", "KasminaLayer", "LayerHealthReport",
    "LifecycleError", "LifecycleEvent", "LocalController", "SeedHealth", "SeedOutcome",
    "SeedLayer", "SeedLayerSummary", "SeedStage", "Summary", "UnknownBlueprintError",
    "UnknownSeedError",
    "UnknownStrategyError", "catalog", "check_unique_ids", "export", "get_blueprint",
    "get_strategy", "host_parameters", "name_layers", "prepare_ddp", "register_blueprint",
    "register_strategy",
    "seed_layers", "split_chunks", "summary", "wrap",
]


def __getattr__(name: str) -> object:
    # The fleet bridge needs the bus library (oona); library use without a fleet does not.
    if name in ("attach", "FleetRuntime"):
        from .extras import requires_extras
        with requires_extras(f"kasmina.{name}", "fleet"):
            from . import fleet
        return getattr(fleet, name)
    raise AttributeError(f"module 'kasmina' has no attribute {name!r}")
