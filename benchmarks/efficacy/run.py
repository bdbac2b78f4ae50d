"""Does growth pay? Every method on one task in one run, over several random seeds, with the
controls a reviewer asks for: the host alone, the host grown with the library's defaults and
with a candidate set of defaults, static-final (the grown architecture trained from scratch,
identity-initialised), insertion (the same modules switched in at their germination epoch, no
lifecycle), a plain static model of matched parameters, GroMo on the same parameter budget
(MLP tasks), and ablations of the default lifecycle (random placement, no reconstruction
phase, no ramp, a fixed schedule instead of plateaus). Writes
benchmarks/results/efficacy_<task>_cpu_<date>.md, .csv and .png (issue #17).

    python benchmarks/efficacy/run.py --task all --seeds 5      # ~20 min on one core
    python benchmarks/efficacy/run.py --task digits --quick     # seconds: a smoke run
    python benchmarks/efficacy/run.py --task all --ablate changes   # which change pays
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ("digits", "regression", "charlm")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/efficacy/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=(*TASKS, "all"), default="all")
    p.add_argument("--seeds", type=int, default=None,
                   help="random seeds per method (default 5; 2 with --quick); at least 2")
    p.add_argument("--quick", action="store_true",
                   help="a few epochs per run: checks the harness, measures nothing")
    p.add_argument("--ablate", choices=("default", "candidate", "changes"), default="default",
                   help="the configuration the lifecycle ablations modify; 'candidate' runs "
                        "only the host, the candidate, its controls and its ablations; "
                        "'changes' runs the host and, for each field the candidate changes, "
                        "the defaults with that change and the candidate without it "
                        "(plan.change_sets)")
    p.add_argument("--subsets", default=None,
                   help="with --ablate changes: comma-separated configurations to run instead, "
                        "e.g. default+min_delta+seed_lr,candidate-ramp_steps (plan.change_set)")
    p.add_argument("--controls", action="store_true",
                   help="with --ablate changes: each configuration also with its static-final, "
                        "insertion and insertion_all controls")
    p.add_argument("--tag", default="", help="a suffix of the report's file names (another "
                                              "--subsets run of the same date, say)")
    p.add_argument("--jobs", type=int, default=1,
                   help="one-thread processes running seeds (with --ablate changes: single "
                        "configurations of a seed) side by side; 1: all in this process")
    p.add_argument("--out", default=str(HERE.parent / "results"), help="folder for the reports")
    p.add_argument("--date", default=datetime.datetime.now(datetime.UTC).date().isoformat())
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    if args.seeds < 2:
        p.error("--seeds must be at least 2 (a paired interval needs two pairs)")
    if args.subsets is not None and args.ablate != "changes":
        p.error("--subsets needs --ablate changes")
    if args.controls and args.ablate != "changes":
        p.error("--controls needs --ablate changes (the main run has its controls)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import logging

    import plan
    import torch

    torch.set_num_threads(1)
    # Growth pauses and similar notes go to the "kasmina" logger; the report counts outcomes.
    logging.getLogger("kasmina").setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = TASKS if args.task == "all" else (args.task,)
    for name in names:
        written = plan.run_task(name, args.seeds, args.quick, out, args.date, args.ablate,
                                None if args.subsets is None else args.subsets.split(","),
                                args.jobs, args.tag, args.controls)
        for path in written:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
