"""`wrap`: put seed layers into an existing model in place, chosen the way PEFT's
`target_modules` chooses (by type, by path suffix or by a regex over the path).

Some modules of a chosen type are left alone, each kind with one line on the "kasmina" logger:
- a module whose parent reads its weight instead of calling it (MultiheadAttention's out_proj,
  LinearCrossEntropyLoss's linear, Mamba's dt_proj, ...): a seed there would never run. Found by
  reading the parent class's source for `self.<name>.weight` / `.bias`, so a parent written
  after this file is covered too; `exclude=` covers what a source scan cannot see;
- a module whose weight is tied to another module's (GPT-2's lm_head and wte), unless
  `target_modules` names it: Hugging Face finds a tied weight by its path (`tie_weights` raises
  and `save_pretrained` refuses once a seed layer sits in between); wrapped by name, the seed
  layer keeps the host's very Parameter, so the tie holds while training;
- a module that sits at two paths: one seed layer cannot have two ids.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import re
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from .config import KasminaConfig
from .distributed import prepare_ddp
from .dual import DualPathLayer
from .host import conv1d_type
from .layer import KasminaLayer

SEED_LAYER_TYPES = (KasminaLayer, DualPathLayer)

log = logging.getLogger("kasmina")

# A module path selector: a list of names matched as path suffixes at "." boundaries, or one
# regex matched with re.fullmatch against the full path (PEFT's `target_modules` semantics).
ModuleSelector = str | Iterable[str]

# Parents whose source reads a child's weight only on a fast path that a seed layer turns off:
# TransformerEncoderLayer's inference path is skipped when a sub-module has a forward pre-hook,
# and every seed layer registers one.
_FAST_PATH_READS: dict[type[nn.Module], frozenset[str]] = {
    nn.TransformerEncoderLayer: frozenset({"linear1", "linear2"}),
}
_METADATA = frozenset({"dtype", "device", "shape", "is_cuda", "ndim"})
# Set-up methods: they run before training, never on the forward path.
_NOT_FORWARD = re.compile(r"(^|_)(init|reset|tie|resize)|repr|state_dict")


def default_targets() -> tuple[type[nn.Module], ...]:
    """nn.Linear (and its subclasses) and, when transformers is loaded, its Conv1D."""
    conv1d = conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def wrap(model: nn.Module, targets: tuple[type[nn.Module], ...] | None = None,
         seeds_per_layer: int = 8, config: KasminaConfig | None = None,
         exclude: ModuleSelector = (), *, target_modules: ModuleSelector | None = None
         ) -> nn.Module:
    """Replace sub-modules with `KasminaLayer`s of `min(seeds_per_layer, out_features)` seeds,
    in place; each layer's `layer_id` is its path in `model` (`name_layers` renames them from
    a root model when blocks were wrapped one by one).

    Chosen: the modules of a `targets` type (default `default_targets()`), or, with
    `target_modules`, those whose path matches it (a list of suffixes, e.g. `["c_fc",
    "mlp.down_proj"]`, or one regex string for `re.fullmatch`); a module named there that
    cannot host seeds raises TypeError, and a `target_modules` that wraps nothing raises
    ValueError. `exclude` takes the same two forms and wins over both. The skips in the module
    docstring apply either way. Idempotent: existing seed layers are kept. Returns the model,
    or the new layer if `model` itself is of a `targets` type."""
    if targets is not None and target_modules is not None:
        raise ValueError("pass targets (module types) or target_modules (paths), not both")
    types = default_targets() if targets is None else tuple(targets)
    excluded = _selector(exclude)
    named = None if target_modules is None else _selector(target_modules)
    if named is None and isinstance(model, types) and not excluded(""):
        _check_host(model, "", "")
        return prepare_ddp(_seed_layer(model, seeds_per_layer, config, ""))

    modules = list(_walk(model))
    paths_of = Counter(id(child) for _, _, child, _ in modules)
    owners = _parameter_owners(model)
    chosen: list[tuple[nn.Module, str, nn.Module, str]] = []
    skipped: dict[tuple[str, str], set[int]] = defaultdict(set)
    for parent, name, child, path in modules:
        inside_chosen = chosen and path.startswith(f"{chosen[-1][3]}.")  # walk is pre-order
        if isinstance(child, SEED_LAYER_TYPES) or inside_chosen or excluded(path):
            continue
        if not (isinstance(child, types) if named is None else named(path)):
            continue
        _check_host(child, path, "target_modules names" if named else "")
        skip = _skip(parent, name, child, paths_of, owners, by_name=named is not None)
        if skip:
            skipped[skip].add(id(child))
        else:
            chosen.append((parent, name, child, path))
    for parent, name, child, path in chosen:
        setattr(parent, name, _seed_layer(child, seeds_per_layer, config, path))
    level = logging.WARNING if named is not None else logging.INFO
    for (kind, reason), ids in skipped.items():
        log.log(level, "kasmina.wrap: skipped %d %s (%s)", len(ids), kind, reason)
    if named is not None and not chosen:
        why = "; ".join(f"{kind}: {reason}" for kind, reason in skipped) or "no path matched"
        raise ValueError(f"target_modules={target_modules!r} wrapped no module of "
                         f"{type(model).__name__} ({why})")
    _no_nested_tensors(model)
    return prepare_ddp(model)


def _selector(spec: ModuleSelector) -> Callable[[str], bool]:
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda path: pattern.fullmatch(path) is not None
    names = tuple(spec)
    return lambda path: any(path == n or path.endswith(f".{n}") for n in names)


def _walk(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module, str]]:
    """(parent, name, child, path) for every sub-module, pre-order, once per path (a shared
    module comes once at each of its paths); the inside of a seed layer is not entered."""
    by_path: dict[str, nn.Module] = {}
    seed_layer = None  # path of the last seed layer met: its inside is its host
    for path, child in model.named_modules(remove_duplicate=False):
        by_path[path] = child
        if not path or (seed_layer is not None and path.startswith(f"{seed_layer}.")):
            continue
        if isinstance(child, SEED_LAYER_TYPES):
            seed_layer = path
        parent, _, name = path.rpartition(".")
        yield by_path[parent], name, child, path


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[int, str]]]:
    """id(parameter) -> [(id(module), "path.name")] of every module that holds it directly."""
    owners: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(prefix=path, recurse=False):
            if (id(module), name) not in owners[id(p)]:
                owners[id(p)].append((id(module), name))
    return owners


def _skip(parent: nn.Module, name: str, child: nn.Module, paths_of: Counter,
          owners: dict[int, list[tuple[int, str]]], by_name: bool) -> tuple[str, str] | None:
    """(kind, reason) when a chosen module must stay as it is; one log line per pair."""
    if paths_of[id(child)] > 1:
        return type(child).__name__, (f"the same module sits at {paths_of[id(child)]} paths; "
                                      f"one seed layer cannot have two ids")
    kind = f"{type(parent).__name__}.{name}"
    if not any(name in names for cls, names in _FAST_PATH_READS.items()
               if isinstance(parent, cls)):
        read = _weight_reads(type(parent)).get(name)
        if read == "direct":
            return kind, "its parent reads the weight directly; seeds there would never run"
        if read == "metadata" and not hasattr(KasminaLayer, "weight"):
            return kind, ("its parent reads the weight's dtype or device, and a seed layer has "
                          "no weight attribute")
    tied = [other for p in child.parameters(recurse=False) for mid, other in owners[id(p)]
            if mid != id(child)]
    if tied and not by_name:
        return kind, (f"its weight is tied to {tied[0]}, and Hugging Face re-ties it by path; "
                      f"name it in target_modules to wrap it anyway, the tie holds")
    return None


@functools.cache
def _weight_reads(cls: type[nn.Module]) -> dict[str, str]:
    """Child name -> "direct" or "metadata" for every `self.<child>.weight` / `.bias` that a
    method of `cls` or of its bases (not nn.Module's) reads; "metadata" when each read is only
    of the tensor's dtype, device or shape (or an isinstance check). Set-up methods (init,
    reset, tie, resize, repr, state_dict) are left out: they are not on the forward path."""
    reads: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass not in (nn.Module, object):
            for name, kind in _class_reads(klass).items():
                if reads.get(name) != "direct":
                    reads[name] = kind
    return reads


@functools.cache
def _class_reads(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):  # no source on disk: nothing to read
        return {}
    reads: dict[str, str] = {}
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
    for method in body:
        if not isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef) or _NOT_FORWARD.search(
                method.name):
            continue
        for node in ast.walk(method):
            for child in ast.iter_child_nodes(node):
                name = _self_child_weight(child)
                if name is None:
                    continue
                meta = ((isinstance(node, ast.Attribute) and node.attr in _METADATA)
                        or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                            and node.func.id == "isinstance"))
                if reads.get(name) != "direct":
                    reads[name] = "metadata" if meta else "direct"
    return reads


def _self_child_weight(node: ast.AST) -> str | None:
    """`name` if `node` is `self.<name>.weight` or `self.<name>.bias`."""
    if (isinstance(node, ast.Attribute) and node.attr in ("weight", "bias")
            and isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"):
        return node.value.attr
    return None


def _no_nested_tensors(model: nn.Module) -> None:
    """TransformerEncoder's nested-tensor path (eval with a padding mask) reads
    `layers[0].linear1.weight` and hands the layers a nested tensor, which a seed layer cannot
    split into chunks: off for every encoder that holds a seed layer."""
    turned_off = 0
    for module in model.modules():
        if (isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor",
                                                                  False)
                and any(isinstance(m, SEED_LAYER_TYPES) for m in module.layers.modules())):
            module.use_nested_tensor = False
            turned_off += 1
    if turned_off:
        log.info("kasmina.wrap: turned off the nested-tensor path of %d TransformerEncoder "
                 "(it reads linear1.weight directly and seed layers take dense tensors)",
                 turned_off)


def _can_host(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _check_host(module: nn.Module, path: str, chosen_by: str) -> None:
    """TypeError (before anything is replaced) for a chosen module that cannot host seeds."""
    where = f"{chosen_by} {path!r}".strip() if path else "the model"
    if not _can_host(module):
        raise TypeError(f"{where}: a {type(module).__name__} cannot host seeds (seed layers "
                        f"wrap nn.Linear or transformers' Conv1D)")
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise TypeError(f"{where}: a {type(module).__name__} has no shape yet; run one forward "
                        f"pass before wrapping")


def _seed_layer(host: nn.Module, seeds: int, config: KasminaConfig | None,
                layer_id: str) -> KasminaLayer | DualPathLayer:
    """A chunked `KasminaLayer`; with `execution_path="legacy"` a `DualPathLayer` on its legacy
    path (a model built legacy is one that migrates: both paths, switchable)."""
    width = host.out_features if isinstance(host, nn.Linear) else host.nf  # Conv1D: nf
    kind = DualPathLayer if config is not None and config.execution_path == "legacy" else (
        KasminaLayer)
    return kind(host, min(seeds, width), config, layer_id=layer_id)


def _seed_layer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of every seed layer in module order; a `DualPathLayer`'s two paths are
    its own, not the model's."""
    inside = None
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        if isinstance(module, SEED_LAYER_TYPES):
            yield path, module
            if isinstance(module, DualPathLayer):
                inside = f"{path}." if path else ""
            if inside == "":
                return


def seed_layers(model: nn.Module) -> list[KasminaLayer | DualPathLayer]:
    """Every seed layer (`KasminaLayer`, `DualPathLayer`) in the model, in module order."""
    return [m for _, m in _seed_layer_modules(model)]


# The id of a seed layer that is the model itself (its path is ""; an id is never empty, as
# oona.ids requires: it names the layer in commands and reports).
ROOT_LAYER_ID = "root"


def name_layers(model: nn.Module) -> list[KasminaLayer]:
    """Set every seed layer's `layer_id` to its path in `model` (the root: ids from `wrap` on
    separate blocks are paths relative to each block, so they collide), or `ROOT_LAYER_ID` for
    `model` itself, and return the layers in module order. Controllers and the fleet bridge
    call this on the model they are given."""
    layers = []
    for path, module in _seed_layer_modules(model):
        module.layer_id = path or ROOT_LAYER_ID
        layers.append(module)
    check_unique_ids(layers)
    return layers


def unique_seed_layers(model: nn.Module) -> list[KasminaLayer]:
    """The model's seed layers, each with a unique id: the ids they have, or, when two collide
    (blocks wrapped separately), their paths in `model` (`name_layers`)."""
    layers = seed_layers(model)
    if len({layer.layer_id for layer in layers}) < len(layers):
        return name_layers(model)
    return layers


def check_unique_ids(layers: Iterable[KasminaLayer]) -> None:
    """ValueError naming every `layer_id` that more than one layer has: commands, reports and
    field reports address a layer by its id."""
    counts = Counter(layer.layer_id for layer in layers)
    dupes = {i: n for i, n in counts.items() if n > 1}
    if dupes:
        listed = ", ".join(f"{i!r} ({n} layers)" for i, n in sorted(dupes.items()))
        raise ValueError(f"seed layer ids collide: {listed}; call kasmina.name_layers(root) on "
                         f"the whole model so each id is the layer's path in it")


def host_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a training loop's optimizer should own: all but the blueprints', which the
    seeds' own optimizer steps (`LocalController.step` / `KasminaLayer.step`)."""
    seeded = {id(p) for layer in seed_layers(model) for p in _blueprint_parameters(layer)}
    return [p for p in model.parameters() if id(p) not in seeded]


def _blueprint_parameters(layer: KasminaLayer) -> Iterable[nn.Parameter]:
    if hasattr(layer, "blueprint_parameters"):
        return layer.blueprint_parameters()
    return layer.banks.parameters()
