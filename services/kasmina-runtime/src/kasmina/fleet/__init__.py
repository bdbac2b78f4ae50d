"""Kasmina in the fleet: seed layers driven over the Oona bus (needs `oona`)."""

from .runtime import FleetRuntime, attach
from .wire import CommandTarget, health_to_proto, outcome_to_field_report

__all__ = ["CommandTarget", "FleetRuntime", "attach", "health_to_proto",
           "outcome_to_field_report"]
