"""The main job until the fleet exists: train an under-sized MLP on scikit-learn's digits with
seed layers grown by the `LocalController`, next to the same host trained alone, over several
random seeds, and print what happened."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .config import KasminaConfig
from .controller import ControllerConfig, LocalController
from .lifecycle import SeedStage
from .wrap import host_parameters, seed_layers, wrap


@dataclass
class RunResult:
    seeded: bool
    seed: int
    val_loss: list[float] = field(default_factory=list)
    test_accuracy: float = 0.0
    final_stages: dict[str, int] = field(default_factory=dict)
    params_host: int = 0
    params_added: int = 0
    events: list[str] = field(default_factory=list)


def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed,
                                              stratify=y)
    x_tr, x_va, y_tr, y_va = train_test_split(x_tr, y_tr, test_size=0.2, random_state=seed,
                                              stratify=y_tr)
    t = torch.from_numpy
    return {"x_tr": t(x_tr), "y_tr": t(y_tr), "x_va": t(x_va), "y_va": t(y_va),
            "x_te": t(x_te), "y_te": t(y_te)}


def make_host(hidden: int, depth: int) -> nn.Module:
    """An under-sized host: `depth` linear layers of width `hidden` with no activation between
    them, so the host alone is a linear classifier and any non-linearity must be grown."""
    dims = [64] + [hidden] * (depth - 1) + [10]
    return nn.Sequential(*(nn.Linear(a, b) for a, b in zip(dims, dims[1:])))


def train(data: dict[str, torch.Tensor], args: argparse.Namespace, seed: int, seeded: bool,
          progress: tqdm) -> RunResult:
    torch.manual_seed(seed)
    model = make_host(args.hidden, args.depth)
    result = RunResult(seeded=seeded, seed=seed,
                       params_host=sum(p.numel() for p in model.parameters()))
    ctl = None
    if seeded:
        cfg = KasminaConfig(higher_is_better=False, seed_lr=args.seed_lr)
        wrap(model, seeds_per_layer=args.seeds_per_layer, config=cfg, exclude=(str(args.depth - 1),))
        ctl = LocalController(model, ControllerConfig(
            higher_is_better=False, plateau_epochs=args.plateau_epochs, min_delta=args.min_delta,
            blueprints=tuple(args.blueprints.split(","))))
    opt = torch.optim.Adam(host_parameters(model), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(data["y_tr"])

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(data["x_va"]), data["y_va"]).item()

    for epoch in range(args.epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(args.batch_size):
            loss = F.cross_entropy(model(data["x_tr"][idx]), data["y_tr"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ctl is not None:
                ctl.step(loss.detach())
        metric = val_loss()
        result.val_loss.append(metric)
        if ctl is not None:
            for e in ctl.end_epoch(metric, evaluate=val_loss):
                result.events.append(f"epoch {epoch + 1:3d}  {e.layer_id}[{e.seed_id}] "
                                     f"{e.from_stage.name} -> {e.to_stage.name} ({e.reason})")
        progress.update(1)
        progress.set_postfix(run=("seeded" if seeded else "host") + f"/{seed}",
                             val_loss=f"{metric:.3f}")
    model.eval()
    with torch.no_grad():
        pred = model(data["x_te"]).argmax(1)
    result.test_accuracy = (pred == data["y_te"]).float().mean().item()
    if ctl is not None:
        layers = seed_layers(model)
        stages = Counter()
        for layer in layers:
            stages.update(layer.stage_counts)
        result.final_stages = dict(stages)
        result.params_added = sum(layer.params_added() for layer in layers)
    return result


def summarize(results: list[RunResult]) -> str:
    host = np.array([r.test_accuracy for r in results if not r.seeded])
    seeded_runs = [r for r in results if r.seeded]
    seeded = np.array([r.test_accuracy for r in seeded_runs])
    ends = Counter()
    for r in seeded_runs:
        ends.update(e.split(" -> ")[1].split(" ")[0] for e in r.events)
    lines = [
        "", "Kasmina demo: digits, under-sized MLP host, seeds grown by the LocalController", "",
        f"{'run':<14}{'test accuracy (mean ± std over seeds)':<42}{'per seed'}",
        f"{'host alone':<14}{host.mean():.4f} ± {host.std():.4f}{'':<25}"
        f"{', '.join(f'{a:.4f}' for a in host)}",
        f"{'host + seeds':<14}{seeded.mean():.4f} ± {seeded.std():.4f}{'':<25}"
        f"{', '.join(f'{a:.4f}' for a in seeded)}",
        "", f"difference: {seeded.mean() - host.mean():+.4f} (spread: host {np.ptp(host):.4f}, "
        f"seeded {np.ptp(seeded):.4f})",
        f"host parameters: {results[0].params_host}; blueprint parameters added (mean): "
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
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--runs", type=int, default=3, help="random seeds per variant")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--depth", type=int, default=2, help="linear layers in the host")
    p.add_argument("--seeds-per-layer", type=int, default=4)
    p.add_argument("--blueprints", default="residual_mlp")
    p.add_argument("--plateau-epochs", type=int, default=3)
    p.add_argument("--min-delta", type=float, default=0.01, help="val-loss plateau threshold")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed-lr", type=float, default=3e-3)
    p.add_argument("--out", default="runs/demo", help="folder for results.json and events.log")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_data()
    start = time.perf_counter()
    results = []
    with tqdm(total=2 * args.runs * args.epochs, unit="epoch", desc="training") as progress:
        for seed in range(args.runs):
            for seeded in (False, True):
                results.append(train(data, args, seed, seeded, progress))
    text = summarize(results)
    print(text)
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    (out / "events.log").write_text("\n".join(e for r in results for e in r.events) + "\n")
    (out / "summary.txt").write_text(text + "\n")
    print(f"results, lifecycle events and summary written to {out}/")


if __name__ == "__main__":
    main()
