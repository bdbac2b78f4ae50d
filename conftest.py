"""Repository-wide pytest hooks: `slow` tests (a soak, the containers' smoke) run only with
RUN_SLOW=1; `make test` and CI skip them, saying so."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with RUN_SLOW=1 (minutes; see its docstring)")
    for item in items:
        if item.get_closest_marker("slow") is not None:  # the marker, not a param id
            item.add_marker(skip)
