"""The two execution paths side by side in one run (issue #13, DESIGN §9): legacy (one seed over
the whole layer) vs chunked, per training step and per epoch, on a small transformer-ish model:
`layers` residual blocks x + Linear(gelu(LayerNorm(x))) of width `hidden` (256 and 1024), every
Linear a seed layer (except in bare).

Modes (seeds = 32 chunked seeds per layer; n = max(1, round(0.1 * seeds)) = 3):
- bare: the host model alone.
- legacy_dormant / legacy_grafting: KasminaLayer(host, 1, execution_path="legacy"), the seed
  dormant / GRAFTING (fixed_ramp; alpha reaches 1 and stays, no controller moves it on).
- chunked_dormant / chunked_graft10: KasminaLayer(host, seeds), every seed dormant / n seeds
  GRAFTING, max_active_seeds = bank_slots = n (as bench_step.py's graft10).
- dual_legacy / dual_chunked: DualPathLayer(host, seeds) on the legacy / chunked path, dormant
  (the cost of holding both paths).

A training step: forward on (rows, hidden), loss = mean((out - 1)^2), backward, SGD over the host
parameters, `layer.step(loss)` on every seed layer. An epoch: `steps` steps then `end_epoch` on
every seed layer. Epochs run round robin over the modes, in a fresh (seeded) order each round
(one warm-up epoch each, untimed), so drift in the machine's speed spreads over all modes. Per mode:
step ms (the epoch's steps / steps, median over epochs), end_epoch ms (median), epoch ms
(median) and the ratios to bare. On CUDA the
windows are closed by torch.cuda.synchronize(). Checked before timing: every dormant mode's
output equals bare's bit for bit (exit status 1 otherwise, still timed).

Writes benchmarks/results/paths_<cpu|cuda_gpuname>_<date>.csv (the device and the 1-minute load
average before and after each width on every row) and prints a table.

    PYTHONPATH=services/kasmina-runtime/src python3 benchmarks/bench_paths.py [--device cuda]
        [--hidden 256,1024] [--steps 100] [--epochs 3] [--rows 256] [--modes bare,...]
        [--threads N]

On this project's shared 2-core CPU machine (a check of the script, and a rough comparison):
    nice python3 benchmarks/bench_paths.py --rows 64 --steps 50 --epochs 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from kasmina import DualPathLayer, KasminaConfig, KasminaLayer, SeedStage, host_parameters
from torch import nn

MODES = ("bare", "legacy_dormant", "legacy_grafting", "chunked_dormant", "chunked_graft10",
         "dual_legacy", "dual_chunked")
DORMANT = {"legacy_dormant", "chunked_dormant", "dual_legacy", "dual_chunked"}
SEEDS, BP, S = 32, "residual_mlp", SeedStage
RESULTS = Path(__file__).resolve().parent / "results"


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(hidden), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (R, H)
        return x + self.lin(torch.nn.functional.gelu(self.norm(x)))


def seed_layer(mode: str, host: nn.Linear) -> nn.Module:
    n = max(1, round(0.1 * SEEDS))
    if mode.startswith("legacy"):
        layer = KasminaLayer(host, 1, KasminaConfig(execution_path="legacy"))
        if mode == "legacy_grafting":
            layer.germinate(0, BP)
            layer.transition(0, S.GRAFTING)
        return layer
    if mode == "chunked_dormant":
        return KasminaLayer(host, SEEDS, KasminaConfig())
    if mode == "chunked_graft10":
        layer = KasminaLayer(host, SEEDS, KasminaConfig(max_active_seeds=n, bank_slots=n))
        with layer.batch():
            for seed in torch.linspace(0, SEEDS - 1, n).round().long().tolist():
                layer.germinate(seed, BP)
                layer.transition(seed, S.TRAINING)
                layer.transition(seed, S.GRAFTING, force=True)
        return layer
    path = mode.removeprefix("dual_")
    return DualPathLayer(host, SEEDS, KasminaConfig(execution_path=path))


def build(mode: str, template: nn.Sequential, device: str) -> tuple[nn.Module, list]:
    model = copy.deepcopy(template)
    layers = []
    if mode != "bare":
        for block in model:
            block.lin = seed_layer(mode, block.lin)
            layers.append(block.lin)
    return model.to(device), layers


def run_epoch(model: nn.Module, layers: list, opt: torch.optim.Optimizer, xs: list,
              steps: int, cuda: bool) -> tuple[float, float]:
    """(seconds of the steps, seconds of the boundary)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = (model(xs[i % len(xs)]) - 1).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for layer in layers:
            layer.step(loss.detach())
    sync()
    t1 = time.perf_counter()
    for layer in layers:
        layer.end_epoch(0.5)
    sync()
    return t1 - t0, time.perf_counter() - t1


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model n")]
    return f"{cpu[0].split(':', 1)[1].strip() if cpu else '?'} ({torch.get_num_threads()} threads)"


def bench(hidden: int, args: argparse.Namespace) -> tuple[list[dict], bool]:
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    template = nn.Sequential(*(Block(hidden) for _ in range(args.layers)))
    xs = [torch.randn(args.rows, hidden, device=args.device) for _ in range(4)]
    modes = {}
    for mode in args.modes:
        model, layers = build(mode, template, args.device)
        modes[mode] = (model, layers, torch.optim.SGD(host_parameters(model), lr=1e-4))
    ok = True
    with torch.no_grad():
        want = modes["bare"][0](xs[0]) if "bare" in modes else None
        for mode in DORMANT & set(modes):
            if want is not None and not torch.equal(modes[mode][0](xs[0]), want):
                print(f"WRONG: {mode} at hidden {hidden} differs from bare", file=sys.stderr)
                ok = False
    times = {mode: [] for mode in modes}
    order = random.Random(hidden)
    for epoch in range(args.epochs + 1):  # epoch 0: warm-up
        # A fresh order each round: with a rotation each mode ran after the same one, and on
        # the CPU chunked_dormant (always after legacy_grafting) measured 2.6-3.4x bare at
        # hidden 256 against 1.36x run without it.
        for mode in order.sample(list(modes), len(modes)):
            model, layers, opt = modes[mode]
            steps, boundary = run_epoch(model, layers, opt, xs, args.steps, cuda)
            if epoch:
                times[mode].append((steps, boundary))
    rows = []
    for mode, got in times.items():
        step = statistics.median(s for s, _ in got) / args.steps
        boundary = statistics.median(b for _, b in got)
        epoch = statistics.median(s + b for s, b in got)
        rows.append({"mode": mode, "hidden": hidden, "layers": args.layers, "rows": args.rows,
                     "seeds": 0 if mode == "bare" else 1 if mode.startswith("legacy") else SEEDS,
                     "steps_per_epoch": args.steps, "epochs": args.epochs,
                     "step_ms": round(step * 1e3, 4), "end_epoch_ms": round(boundary * 1e3, 4),
                     "epoch_ms": round(epoch * 1e3, 3)})
    bare = next((r for r in rows if r["mode"] == "bare"), None)
    for r in rows:
        r["step_x_bare"] = round(r["step_ms"] / bare["step_ms"], 3) if bare else ""
        r["epoch_x_bare"] = round(r["epoch_ms"] / bare["epoch_ms"], 3) if bare else ""
    return rows, ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--hidden", default="256,1024")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per mode")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.modes = [m for m in MODES if m in args.modes.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    name = device_name(args.device)
    tag = "cpu" if args.device == "cpu" else "cuda_" + "".join(
        c for c in name.split()[-1].lower() if c.isalnum())
    out = RESULTS / f"paths_{tag}_{datetime.date.today().isoformat()}.csv"
    meta = {"date": datetime.date.today().isoformat(), "device": name,
            "torch": torch.__version__}
    all_rows, ok = [], True
    for hidden in (int(h) for h in args.hidden.split(",")):
        load = os.getloadavg()[0]  # on a shared CPU machine, the context of every row
        rows, good = bench(hidden, args)
        ok &= good
        loads = {"load_1m_before": round(load, 2), "load_1m_after": round(os.getloadavg()[0], 2)}
        all_rows += [{**meta, **loads, **r} for r in rows]
        out.parent.mkdir(exist_ok=True)
        with out.open("w", newline="") as f:  # after every width: a run cut short keeps some
            writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
            writer.writeheader()
            writer.writerows(all_rows)
    print(f"{name}, torch {torch.__version__}: {args.layers} blocks, {args.rows} rows, "
          f"{args.steps} steps x {args.epochs} epochs per mode")
    print(f"{'hidden':>6} {'mode':<16} {'seeds':>5} {'step ms':>9} {'x bare':>7} "
          f"{'end_epoch ms':>12} {'epoch ms':>9} {'x bare':>7}")
    for r in all_rows:
        print(f"{r['hidden']:>6} {r['mode']:<16} {r['seeds']:>5} {r['step_ms']:>9.3f} "
              f"{r['step_x_bare']:>7} {r['end_epoch_ms']:>12.3f} {r['epoch_ms']:>9.1f} "
              f"{r['epoch_x_bare']:>7}")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
