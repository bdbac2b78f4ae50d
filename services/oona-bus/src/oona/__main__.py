"""`python -m oona`: see oona.cli."""

from oona.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
