"""The main job until the fleet exists: train an under-sized MLP on scikit-learn's digits with
seed layers grown by the `LocalController`, next to the same host trained alone, over several
random seeds, and print what happened."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .controller import ControllerConfig, LocalController
from .recipes import (
    DIGITS_CONTROLLER,
    DigitsParams,
    EpochRecord,
    RunResult,
    build_model,
    load_digits_split,
    train_digits,
)


def run(p: DigitsParams, data: dict[str, torch.Tensor], controller: ControllerConfig,
        progress: tqdm) -> tuple[RunResult, list[str]]:
    model = build_model(p)
    ctl = None
    if p.seeded:
        ctl = LocalController(model, controller)
    events: list[str] = []

    def on_epoch(record: EpochRecord, new_events: object, _snapshot: object) -> bool:
        for e in new_events or ():
            events.append(f"epoch {record.epoch:3d}  {e.layer_id}[{e.seed_id}] "
                          f"{e.from_stage.name} -> {e.to_stage.name} ({e.reason})")
        progress.update(1)
        progress.set_postfix(run=("seeded" if p.seeded else "host") + f"/{p.seed}",
                             val_loss=f"{record.val_loss:.3f}")
        return True

    return train_digits(p, model, ctl, data, on_epoch), events


def summarize(results: list[tuple[RunResult, list[str]]]) -> str:
    host = np.array([r.test_accuracy for r, _ in results if not r.params.seeded])
    seeded_runs = [r for r, _ in results if r.params.seeded]
    seeded = np.array([r.test_accuracy for r in seeded_runs])
    ends = Counter()
    for _, events in results:
        ends.update(e.split(" -> ")[1].split(" ")[0] for e in events)
    lines = [
        "", "Kasmina demo: digits, under-sized MLP host, seeds grown by the LocalController", "",
        f"{'run':<14}{'test accuracy (mean ± std over seeds)':<42}{'per seed'}",
        f"{'host alone':<14}{host.mean():.4f} ± {host.std():.4f}{'':<25}"
        f"{', '.join(f'{a:.4f}' for a in host)}",
        f"{'host + seeds':<14}{seeded.mean():.4f} ± {seeded.std():.4f}{'':<25}"
        f"{', '.join(f'{a:.4f}' for a in seeded)}",
        "", f"difference: {seeded.mean() - host.mean():+.4f} (std: host {host.std():.4f}, "
        f"seeded {seeded.std():.4f}; range: host {np.ptp(host):.4f}, seeded {np.ptp(seeded):.4f})",
        "paired differences (seeded - host, per random seed): "
        + ", ".join(f"{d:+.4f}" for d in seeded - host),
        f"host parameters: {results[0][0].params_host}; blueprint parameters added (mean): "
        f"{np.mean([r.params_added for r in seeded_runs]):.0f}",
        "transitions over all seeded runs: " + ", ".join(
            f"{k} {v}" for k, v in sorted(ends.items())),
        "seeds by final stage (per run): " + "; ".join(
            ", ".join(f"{k} {v}" for k, v in sorted(r.final_stages.items()))
            for r in seeded_runs),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kasmina demo", description=__doc__)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--runs", type=int, default=5, help="random seeds per variant")
    p.add_argument("--hidden", type=int, default=64, help="width of the seeded host layer")
    p.add_argument("--bottleneck", type=int, default=4, help="width of the host's bottleneck")
    p.add_argument("--seeds-per-layer", type=int, default=4)
    p.add_argument("--blueprints", default="residual_mlp")
    p.add_argument("--plateau-epochs", type=int, default=DIGITS_CONTROLLER.plateau_epochs)
    p.add_argument("--germinations-per-plateau", type=int,
                   default=DIGITS_CONTROLLER.germinations_per_plateau)
    p.add_argument("--min-delta", type=float, default=DIGITS_CONTROLLER.min_delta,
                   help="val-loss plateau threshold")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed-lr", type=float, default=3e-3)
    p.add_argument("--out", default="runs/demo", help="folder for results.json and events.log")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_digits_split()
    controller = ControllerConfig(
        mode="min", plateau_epochs=args.plateau_epochs, min_delta=args.min_delta,
        germinations_per_plateau=args.germinations_per_plateau,
        blueprints=tuple(args.blueprints.split(",")))
    start = time.perf_counter()
    results = []
    with tqdm(total=2 * args.runs * args.epochs, unit="epoch", desc="training") as progress:
        for seed in range(args.runs):
            for seeded in (False, True):
                p = DigitsParams(epochs=args.epochs, hidden=args.hidden,
                                 bottleneck=args.bottleneck,
                                 seeds_per_layer=args.seeds_per_layer, seed=seed, lr=args.lr,
                                 seed_lr=args.seed_lr, batch_size=args.batch_size,
                                 seeded=seeded)
                results.append(run(p, data, controller, progress))
    text = summarize(results)
    print(text)
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        [{**dataclasses.asdict(r), "events": ev} for r, ev in results], indent=1))
    (out / "events.log").write_text("\n".join(e for _, ev in results for e in ev) + "\n")
    (out / "summary.txt").write_text(text + "\n")
    print(f"results, lifecycle events and summary written to {out}/")


if __name__ == "__main__":
    main()
