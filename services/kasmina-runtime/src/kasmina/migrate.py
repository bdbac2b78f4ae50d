"""`python -m kasmina migrate`: a checkpoint of legacy seed layers -> one of `DualPathLayer`s.

A legacy layer (`KasminaLayer(host, 1, KasminaConfig(execution_path="legacy"))`) at `<p>` is
found by its keys: `<p>.state` of shape (1, 4), `<p>.host.weight` and a `<p>._extra_state` of a
seed table on the short lifecycle. The migrated state is that of a `DualPathLayer` at `<p>`
(what `wrap(model, config=KasminaConfig(execution_path="legacy"))` builds): `<p>.legacy.*` the
legacy layer's entries unchanged, `<p>.chunked.*` a fresh dormant chunked layer of N seeds over
the same host shape (built with the default `KasminaConfig`, as `wrap` builds it), the host's
tensors under both, and the `DualPathLayer`'s own `_extra_state` naming the active path. The
legacy seed is frozen where it is, so the model's outputs are the original's, exactly.

Torch only: the command reads and writes with `torch.load(weights_only=True)` / `torch.save`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import KasminaConfig
from .layer import KasminaLayer
from .lifecycle import LEGACY_TRANSITIONS, SeedStage
from .seed_table import STAGE

S = SeedStage
# The stages of the short lifecycle: a one-seed table whose stages all lie here is legacy when
# its bookkeeping does not name its lifecycle.
LEGACY_STAGES = frozenset(s for s, targets in LEGACY_TRANSITIONS.items() if targets) | frozenset(
    t for targets in LEGACY_TRANSITIONS.values() for t in targets)
GROWING = (S.GERMINATED, S.GRAFTING)
MODEL_KEYS = ("model", "state_dict")  # where a checkpoint dict holds the model's state


class MigrationError(ValueError):
    """The input cannot be migrated; the message is the one line the command prints."""


@dataclass
class LayerMigration:
    path: str  # the layer's module path ("" for a model that is the layer)
    stage: SeedStage  # the legacy seed's stage
    seeds_after: int
    params_before: int  # the layer's parameters (host and blueprint banks)
    params_after: int

    def describe(self, active: str) -> str:
        name = self.path or "(the model)"
        return (f"{name}: legacy KasminaLayer -> DualPathLayer on the {active} path; seeds 1 -> "
                f"{self.seeds_after}; stages: legacy seed {self.stage.name} "
                f"({'frozen' if active == 'chunked' else 'active'}), chunked {self.seeds_after} "
                f"DORMANT; parameters {self.params_before:,} -> {self.params_after:,} "
                f"(+{self.params_after - self.params_before:,}: the chunked path's banks)")


def _json(t: torch.Tensor) -> dict | None:
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1):
        return None
    try:
        value = json.loads(bytes(t.cpu().numpy().tobytes()).decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _extra(value: dict) -> torch.Tensor:
    """JSON bytes in a uint8 tensor, as the layers' get_extra_state writes them."""
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def model_state(checkpoint: object) -> tuple[dict[str, torch.Tensor], str | None]:
    """The model's state_dict in a checkpoint and the key holding it (None: the checkpoint is
    the state_dict itself, as `torch.save(model.state_dict())` writes it)."""
    if isinstance(checkpoint, Mapping):
        for key in MODEL_KEYS:
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and inner and all(
                    isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner), key
        if checkpoint and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                              for k, v in checkpoint.items()):
            return dict(checkpoint), None
    raise MigrationError("not a checkpoint: expected a state_dict, or a dict holding one under "
                         f"{' or '.join(repr(k) for k in MODEL_KEYS)}")


def _is_legacy(state: dict[str, torch.Tensor], prefix: str) -> bool:
    table = state.get(f"{prefix}state")
    extra = _json(state.get(f"{prefix}_extra_state"))
    if (table is None or tuple(table.shape) != (1, 4) or extra is None
            or "records" not in extra or f"{prefix}host.weight" not in state):
        return False
    parent = prefix[:-1].rpartition(".")[0]
    outer = _json(state.get(f"{parent}._extra_state" if parent else "_extra_state"))
    if prefix and outer is not None and "path" in outer:
        return False  # a path of a DualPathLayer: migrated already
    if "lifecycle" in extra:
        return extra["lifecycle"] == "legacy"
    # Written before the table recorded its lifecycle: a one-seed table that never left the
    # short lifecycle's stages (a dormant one-seed chunked layer looks the same, and migrates
    # to the same function).
    stages = {int(table[0, STAGE])} | {int(s) for r in extra["records"].values()
                                       for s, _ in r["history"]}
    return stages <= {int(s) for s in LEGACY_STAGES}


def legacy_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    """The key prefixes ("a.b." or "" for the root) of the legacy seed layers, in key order."""
    prefixes = [k[:-len("state")] for k in state if k == "state" or k.endswith(".state")]
    return [p for p in prefixes if _is_legacy(state, p)]


def _fresh_chunked(state: dict[str, torch.Tensor], prefix: str,
                   seeds: int) -> KasminaLayer:
    """A dormant chunked layer over a host of the legacy layer's shape (a Linear's weight is
    (out, in), transformers' Conv1D's (in, out); the bias, when there is one, is (out,))."""
    weight, bias = state[f"{prefix}host.weight"], state.get(f"{prefix}host.bias")
    out = bias.shape[0] if bias is not None else weight.shape[0]
    host = nn.Linear(weight.numel() // out, out, bias=bias is not None)
    return KasminaLayer(host, min(seeds, out), KasminaConfig())


def _param_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Host and blueprint-bank parameters (a bank's parameters are its `flat` tensor)."""
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix) and (
        k.startswith(f"{prefix}host.") or (k.startswith(f"{prefix}banks.")
                                            and k.endswith(".flat"))))


def migrate_state(state: dict[str, torch.Tensor], seeds_per_layer: int = 8,
                  path: str = "chunked") -> tuple[dict[str, torch.Tensor], list[LayerMigration]]:
    """The migrated state_dict (keys in the original order, each layer's new keys where its
    old ones were) and what changed per layer. MigrationError: nothing to migrate, or a growing
    legacy seed when the chunked path is to be active."""
    if path not in ("chunked", "legacy"):
        raise MigrationError(f"--path must be 'chunked' or 'legacy', got {path!r}")
    if seeds_per_layer < 1:
        raise MigrationError(f"--seeds-per-layer must be >= 1, got {seeds_per_layer}")
    prefixes = legacy_prefixes(state)
    if not prefixes:
        raise MigrationError("no legacy seed layers in the checkpoint (a <path>.state of shape "
                             "(1, 4) with the legacy lifecycle's <path>._extra_state)")
    changes, new_keys = [], {}
    for prefix in prefixes:
        stage = S(int(state[f"{prefix}state"][0, STAGE]))
        name = prefix[:-1] or "(the model)"
        if path == "chunked" and stage in GROWING:
            raise MigrationError(
                f"{name}: the legacy seed is {stage.name}; fossilize or cull it first, or "
                f"migrate with --path legacy (DualPathLayer.request_path('chunked') ends it at "
                f"an epoch boundary)")
        legacy_extra = _json(state[f"{prefix}_extra_state"])
        chunked = _fresh_chunked(state, prefix, seeds_per_layer)
        # As a switch does: the joining path follows the job's epoch and step.
        chunked.table.epoch, chunked.table.step = legacy_extra["epoch"], legacy_extra["step"]
        chunked.layer_id = legacy_extra["layer_id"]
        fresh = chunked.state_dict()
        entries = {f"{prefix}_extra_state": _extra({"path": path, "pending": None,
                                                    "stepped": False})}
        entries.update({f"{prefix}legacy.{k[len(prefix):]}": v for k, v in state.items()
                        if k.startswith(prefix)})  # seed layers do not nest
        for key, value in fresh.items():
            if key.startswith("host."):
                value = state[f"{prefix}{key}"]  # the same host tensors as the legacy path's
            entries[f"{prefix}chunked.{key}"] = value
        new_keys[prefix] = entries
        before = _param_count(state, prefix)
        changes.append(LayerMigration(prefix[:-1], stage, chunked.num_seeds, before,
                                      before + sum(p.numel() for p in chunked.banks.parameters())))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = next((p for p in prefixes if key.startswith(p)), None)
        if owner is None:
            out[key] = value
        elif owner in new_keys:
            out.update(new_keys.pop(owner))  # where the layer's first key was
    return out, changes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kasmina migrate",
        description="Convert a checkpoint of legacy seed layers into one of DualPathLayers "
                    "(what wrap(model, config=KasminaConfig(execution_path='legacy')) builds), "
                    "on the chunked path: same outputs, the legacy seed kept for a rollback.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds-per-layer", type=int, default=8,
                        help="chunked seeds per layer (capped at its width; default 8, as wrap)")
    parser.add_argument("--path", choices=("chunked", "legacy"), default="chunked",
                        help="the active path of the migrated layers (default chunked)")
    parser.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args(argv)
    try:
        if not args.dry_run and args.out.exists() and not args.force:
            raise MigrationError(f"{args.out} exists (--force overwrites it)")
        try:
            checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise MigrationError(f"{args.checkpoint}: no such file") from None
        except Exception as e:  # torch.load raises many types for a file that is not one
            raise MigrationError(f"{args.checkpoint}: not a checkpoint "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
        state, key = model_state(checkpoint)
        migrated, changes = migrate_state(state, args.seeds_per_layer, args.path)
    except MigrationError as e:
        print(f"kasmina migrate: error: {e}", file=sys.stderr)
        return 2
    for change in changes:
        print(change.describe(args.path))
    if args.dry_run:
        print(f"dry run: {len(changes)} layer(s) would change; nothing written")
        return 0
    result = migrated if key is None else {**checkpoint, key: migrated}
    torch.save(result, args.out)
    print(f"wrote {args.out}: {len(changes)} layer(s) migrated")
    return 0
