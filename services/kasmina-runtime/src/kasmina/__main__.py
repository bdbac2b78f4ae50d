"""`python -m kasmina <command>`: `fleet` runs the main job (see README)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m kasmina {demo,fleet,serve,submit} [--help | options]\n\n"
              "  demo    train a model with seed layers on scikit-learn's digits, locally\n"
              "  fleet   the main job: the whole fleet as processes and a real job (make run)\n"
              "  serve   the runtime service: gRPC job API, HTTP health and metrics (needs\n"
              "          OONA_REDIS_URL)\n"
              "  submit  submit a digits job to a running runtime service and follow it")
        sys.exit(0 if argv else 2)
    if argv[0] == "demo":
        from .demo import main as demo
        demo(argv[1:])
    elif argv[0] == "fleet":
        from .fleet_run import main as fleet
        fleet(argv[1:])
    elif argv[0] == "serve":
        from .service.main import serve
        sys.exit(serve())
    elif argv[0] == "submit":
        from .submit import main as submit
        sys.exit(submit(argv[1:]))
    else:
        print(f"unknown command {argv[0]!r}; try --help", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
