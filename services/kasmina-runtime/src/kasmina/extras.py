"""The optional extras of the kasmina-runtime distribution and the error a missing one gives.

The library (`kasmina.wrap`, `KasminaLayer`, `LocalController`) needs torch and numpy only;
everything else is imported inside `requires_extras`, at the entry point that needs it, so a
missing extra is one line naming what to install rather than a traceback from deep inside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# extra (as in pyproject.toml's optional-dependencies) -> the top-level modules it provides.
EXTRAS: dict[str, tuple[str, ...]] = {
    "triton": ("triton",),
    "fleet": ("oona", "grpc", "redis", "fastapi", "uvicorn", "prometheus_client"),
    "demo": ("sklearn", "matplotlib", "tqdm"),
    "hf": ("transformers", "safetensors"),
    "lightning": ("lightning",),
    "bench": ("gromo",),  # benchmarks/efficacy's GroMo control (with demo's packages)
}


class MissingExtraError(ModuleNotFoundError):
    """An entry point needs an extra that is not installed; the message says which."""


def install_hint(what: str, *extras: str) -> str:
    plural = "s" if len(extras) > 1 else ""
    return (f"{what} needs the {' and '.join(extras)} extra{plural}: "
            f"pip install 'kasmina-runtime[{','.join(extras)}]'")


@contextlib.contextmanager
def requires_extras(what: str, *extras: str) -> Iterator[None]:
    """Turn a ModuleNotFoundError for a module of `extras` raised in the block into a
    MissingExtraError naming them. Any other missing module propagates unchanged."""
    unknown = set(extras) - set(EXTRAS)
    assert not unknown, f"unknown extras {sorted(unknown)}"
    try:
        yield
    except MissingExtraError:
        raise
    except ModuleNotFoundError as e:
        top = (e.name or "").partition(".")[0]
        if not any(top in EXTRAS[x] for x in extras):
            raise
        raise MissingExtraError(f"{install_hint(what, *extras)} (no module named {top!r})",
                                name=e.name) from e
