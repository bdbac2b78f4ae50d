from __future__ import annotations

import pytest
import torch
from kasmina import KasminaConfig, KasminaLayer, SeedStage
from torch import nn

PATH_TO = [SeedStage.TRAINING, SeedStage.GRAFTING, SeedStage.STABILIZATION,
           SeedStage.EVALUATING, SeedStage.FINE_TUNING, SeedStage.FOSSILIZED]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _blueprint_catalog():
    """Specs a test registers (a wire spec, the harness's variants) leave with it: a layer
    builds a bank for every catalog entry, so a leaked one changes later tests' layers."""
    from kasmina import blueprints

    saved = dict(blueprints._CATALOG), dict(blueprints._BY_ID)
    yield
    for registry, before in zip((blueprints._CATALOG, blueprints._BY_ID), saved, strict=True):
        registry.clear()
        registry.update(before)


def make_layer(in_f: int = 12, out_f: int = 23, seeds: int = 5, dtype=torch.float32,
               **cfg) -> KasminaLayer:
    host = nn.Linear(in_f, out_f).to(dtype)
    return KasminaLayer(host, seeds, KasminaConfig(**cfg))


def drive(layer: KasminaLayer, seed: int, stage: SeedStage, blueprint="residual_mlp",
          strategy="fixed_ramp") -> None:
    """Force a seed along the happy path up to `stage` (gates skipped, table respected)."""
    layer.germinate(seed, blueprint, strategy)
    for s in PATH_TO:
        layer.transition(seed, s, force=True)
        if s == stage:
            return


@pytest.fixture(name="make_layer")
def _make_layer_fixture():
    return make_layer


@pytest.fixture(name="drive")
def _drive_fixture():
    return drive


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


async def _drain_stream(url: str, stream: str, message_type: type) -> list:
    """Every message of `message_type` on `stream` so far, read by a fresh consumer group."""
    import uuid

    import oona  # the fleet extra: imported here so the GPU machine (no oona) loads conftest

    got = []

    async def on(message, _delivery):  # noqa: ANN001, ANN202
        got.append(message)

    async with oona.open_bus(oona.BusSettings.from_dsn(url)) as bus:
        consumer = bus.consumer(stream, group=f"test-{uuid.uuid4()}", name="t",
                                handlers={message_type: on})
        await consumer.ensure_group()
        while await consumer.poll(block_ms=200):
            pass
    return got


@pytest.fixture(name="drain_stream")
def _drain_stream_fixture():
    """`await drain_stream(url, stream, MessageType)`: what a stream holds so far."""
    return _drain_stream

