"""Paired differences between methods of two result CSVs (the harness's `.csv` files), over
the random seeds both have: a configuration of one run against a control of another (the main
runs' insertion, say: a method's rows repeat bit for bit for the same seeds, NOTES says when).

    python benchmarks/efficacy/pair_csv.py RESULT.csv METHOD BASELINE.csv BASELINE_METHOD
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired  # noqa: E402
from plan import task_of  # noqa: E402


def finals(path: str, method: str) -> dict[int, float]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == method]
    if not rows:
        raise SystemExit(f"{path}: no rows of method {method!r}")
    return {int(r["seed"]): float(r["final"]) for r in rows}


def task_in(path: str) -> str:
    with open(path, newline="") as f:
        return next(csv.DictReader(f))["task"]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("result", "method", "baseline", "baseline_method"):
        ap.add_argument(name)
    args = ap.parse_args(argv)
    path, method, base_path, base_method = (args.result, args.method, args.baseline,
                                            args.baseline_method)
    task = task_in(path)
    got, base = finals(path, method), finals(base_path, base_method)
    seeds = sorted(got.keys() & base.keys())
    d = paired([base[s] for s in seeds], [got[s] for s in seeds], task_of(task, False).direction)
    print(f"{task}: {method} minus {base_method} over seeds {seeds}: {d.mean:+.4f} "
          f"[{d.lo:+.4f}, {d.hi:+.4f}] ({d.better}/{d.n} better){' *' if d.significant else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
