"""`python -m kasmina <command>`: `fleet` runs the main job (see README)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .extras import MissingExtraError, requires_extras

# The extras each command needs: serve and fleet run the digits recipe (scikit-learn), and fleet
# and ab plot their reports (matplotlib).
NEEDS = {"demo": ("demo",), "fleet": ("fleet", "demo"), "serve": ("fleet", "demo"),
         "submit": ("fleet",), "migrate": (), "ab": ("demo",)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m kasmina {demo,fleet,serve,submit,migrate,ab} [--help | options]"
              "\n\n"
              "  demo    train a model with seed layers on scikit-learn's digits, locally\n"
              "  fleet   the main job: the whole fleet as processes and a real job (make run)\n"
              "  serve   the runtime service: gRPC job API, HTTP health and metrics (needs\n"
              "          OONA_REDIS_URL)\n"
              "  submit  submit a digits job to a running runtime service and follow it\n"
              "  migrate convert a checkpoint of legacy seed layers to DualPathLayers on the\n"
              "          chunked path (docs/migration.md)\n"
              "  ab      train the digits job on the legacy and the chunked path, paired, and\n"
              "          write runs/ab/report.md (docs/migration.md)")
        sys.exit(0 if argv else 2)
    if argv[0] not in NEEDS:
        print(f"unknown command {argv[0]!r}; try --help", file=sys.stderr)
        sys.exit(2)
    try:
        with requires_extras(f"python -m kasmina {argv[0]}", *NEEDS[argv[0]]):
            command = _load(argv[0])
    except MissingExtraError as e:
        sys.exit(str(e))  # the one line, on stderr, exit status 1
    sys.exit(command(argv[1:]))


def _load(name: str) -> Callable[[list[str]], int | None]:
    if name == "demo":
        from .demo import main
    elif name == "fleet":
        from .fleet_run import main
    elif name == "serve":
        from .service.main import serve
        return lambda argv: serve()
    elif name == "migrate":
        from .migrate import main
    elif name == "ab":
        from .ab import main
    else:
        from .submit import main
    return main


if __name__ == "__main__":
    main()
