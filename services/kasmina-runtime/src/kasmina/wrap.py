"""`wrap`: put seed layers into an existing model in place."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .config import KasminaConfig
from .layer import KasminaLayer


def wrap(model: nn.Module, targets: tuple[type[nn.Module], ...] = (nn.Linear,),
         seeds_per_layer: int = 8, config: KasminaConfig | None = None,
         exclude: Iterable[str] = ()) -> nn.Module:
    """Replace every sub-module of a `targets` type (except the paths in `exclude`) with a
    `KasminaLayer` of `min(seeds_per_layer, out_features)` seeds, in place. Each layer's
    `layer_id` is its module path. Returns the model (or the new layer, if `model` itself was
    a target)."""
    skip = set(exclude)
    if isinstance(model, targets) and "" not in skip:
        return _seed_layer(model, seeds_per_layer, config, "")
    for path, module in list(model.named_modules()):
        if isinstance(module, KasminaLayer):
            continue
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            if isinstance(child, targets) and full not in skip:
                setattr(module, name, _seed_layer(child, seeds_per_layer, config, full))
    return model


def _seed_layer(host: nn.Module, seeds: int, config: KasminaConfig | None,
                layer_id: str) -> KasminaLayer:
    if not isinstance(host, nn.Linear):
        raise TypeError(f"{layer_id or 'model'}: only nn.Linear can host seeds, "
                        f"got {type(host).__name__}")
    return KasminaLayer(host, min(seeds, host.out_features), config, layer_id=layer_id)


def seed_layers(model: nn.Module) -> list[KasminaLayer]:
    """Every `KasminaLayer` in the model, in module order."""
    return [m for m in model.modules() if isinstance(m, KasminaLayer)]


def host_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a training loop's optimizer should own: all but the blueprints', which the
    seeds' own optimizer steps (`LocalController.step` / `KasminaLayer.step`)."""
    seeded = {id(p) for layer in seed_layers(model) for p in layer.banks.parameters()}
    return [p for p in model.parameters() if id(p) not in seeded]
