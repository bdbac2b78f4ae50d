"""The training step under DistributedDataParallel (BENCHMARKS.md, "The training step as users
pay it", last row: DDP step with dormant seeds / plain DDP step <= 1.05 on 2 and 4 GPUs).

One model, nn.Sequential(Linear(h, h), GELU, Linear(h, h)), bf16 by default, h = 4096, 32,768
rows per rank (weak scaling: every rank its own random batch), in four modes interleaved in one
run, each its own DDP model (NCCL on CUDA, gloo on the CPU, a test of the script):
- plain: the unwrapped model under DDP.
- dormant: the first Linear wrapped (`kasmina.wrap`, before DDP) with 1,024 seeds, all dormant.
- training / graft10 ("growing", 10 %): n = round(0.1 * seeds) seeds (spread evenly) TRAINING /
  GRAFTING (fixed_ramp), grown inside `with layer.batch():` identically on every rank;
  max_active_seeds = bank_slots = n, blueprints = ("residual_mlp",); telemetry every step.
Step (bench_step's `train_step`): forward, backward of a fixed random cotangent (the input
requires grad), SGD over `kasmina.host_parameters`, `LocalController(ddp).step(loss)`.

Check first: after the warm-up steps, a checksum of every parameter and of each seed layer's
`table.state` is all-gathered; any difference between ranks aborts the run (exit status 1).
Timing: warm-up, then `rounds` rounds of one block of `reps` steps per mode in turn, every rank
synchronised (dist.barrier) before each block, CUDA events around it; per block the slowest
rank's time; per mode the median over blocks. Rank 0 reports: step time, ratio to plain and the
scaling efficiency t(1 GPU) / t(N GPUs) of the same mode (ideal 1.0: rows per rank are fixed),
t(1 GPU) from `--baseline-ms` (plain only) or from world-size-1 rows already in the CSV.

Rows are appended (world size on each row) to benchmarks/results/ddp_<gpu>_<date>.csv, so
    for n in 1 2 4; do torchrun --nproc-per-node $n benchmarks/bench_ddp.py; done
fills one CSV, and the bars are printed over every row of it at this shape (2 and 4 GPUs).
    torchrun --nproc-per-node 2 benchmarks/bench_ddp.py --device cpu --quick   # a test, gloo
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import statistics
import sys
from pathlib import Path

import kasmina
import torch
import torch.distributed as dist
from bench_step import DTYPES, Mode, block, config, machine_name, train_step
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

MODES, GROWING = ("plain", "dormant", "training", "graft10"), ("training", "graft10")
BP = "residual_mlp"


def build(mode: str, base: nn.Module, seeds: int, n: int, every: int, dev: str,
          dtype: torch.dtype, local: int) -> Mode:
    model = copy.deepcopy(base)
    ids: list[int] = []
    if mode != "plain":
        model = kasmina.wrap(model, seeds_per_layer=seeds, config=config(n, every),
                             target_modules=["0"])
        if mode in GROWING:
            layer = model[0]
            ids = torch.linspace(0, seeds - 1, n).round().long().tolist()
            with layer.batch():  # the same commands on every rank
                for s in ids:
                    layer.germinate(s, BP)
                    layer.transition(s, kasmina.SeedStage.TRAINING)
                    if mode == "graft10":
                        layer.transition(s, kasmina.SeedStage.GRAFTING, force=True)
            want = kasmina.SeedStage.GRAFTING if mode == "graft10" else kasmina.SeedStage.TRAINING
            assert layer.seeds_in(want) == ids, layer.stage_counts
            layer.drain_events()
    model = model.to(device=dev, dtype=dtype)  # a seed layer: the host only
    ddp = DDP(model, device_ids=[local] if dev == "cuda" else None)
    opt = torch.optim.SGD(kasmina.host_parameters(model), lr=1e-3)
    if mode == "plain":
        return Mode(ddp, model, [opt], lambda: None)
    ctl, loss = kasmina.LocalController(ddp), torch.zeros((), device=dev)
    return Mode(ddp, model, [opt], lambda: ctl.step(loss), model[0], ids, every)


def checksums(m: Mode) -> tuple[list[str], torch.Tensor]:
    """(names, int64 checksums): every parameter's bytes and each seed layer's stage table."""
    names, sums = [], []
    tensors = [(k, p.detach()) for k, p in m.host.named_parameters()]
    tensors += [(f"{layer.layer_id}.table.state", torch.from_numpy(layer.table.state.copy()))
                for layer in kasmina.seed_layers(m.host)]
    for name, t in tensors:
        b = t.contiguous().view(-1).view(torch.uint8).to(torch.int64)
        w = torch.arange(b.numel(), device=b.device) % 65521 + 1  # position-sensitive
        names.append(name)
        sums.append(torch.stack([b.sum(), (b * w).sum()]).cpu())
    return names, torch.stack(sums).view(-1)


def check_ranks(modes: dict, dev: str, rank: int, world: int) -> list[str]:
    """Names of what differs between ranks (the same list on every rank)."""
    bad = []
    for name, m in modes.items():
        keys, mine = checksums(m)
        mine = mine.to(dev)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        for r, theirs in enumerate(every[1:], 1):
            diff = (theirs != every[0]).view(-1, 2).any(1).nonzero().view(-1).tolist()
            bad += [f"{name}: {keys[i]} differs on rank {r} from rank 0" for i in diff]
    return bad


def csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def bars(path: Path, key: dict) -> None:
    rows = [r for r in csv_rows(path) if all(r[k] == str(v) for k, v in key.items())]
    big = key["hidden"] == 4096 and key["rows_per_rank"] == 32768
    table = [("DDP dormant / plain DDP, 2 and 4 GPUs", 1.05, lambda r: r["mode"] == "dormant"),
             ("DDP growing / plain DDP (single-GPU growing bar, 4096x32768)", 1.15,
              lambda r: r["mode"] in GROWING)]
    print(f"\nbars (BENCHMARKS.md), every row of {path.name} at this shape"
          f"{'' if big else ' (not the bars shape 4096x32768: indicative only)'}:")
    print(f"{'bar':<64}{'target':>8}{'worst':>8}{'rows':>6}  verdict")
    for what, limit, which in table:
        got = [r for r in rows if which(r) and r["world_size"] in ("2", "4")]
        missed = [r for r in got if float(r["ratio_to_plain"]) > limit or r["check"] != "ok"]
        worst = max((float(r["ratio_to_plain"]) for r in got), default="")
        worlds = sorted({int(r["world_size"]) for r in got})
        verdict = "no data" if not got else "missed" if missed else "met"
        verdict += "" if worlds == [2, 4] or not got else f" (only {worlds} GPUs so far)"
        print(f"{what:<64}{'<= ' + str(limit):>8}{worst:>8}{len(got):>6}  {verdict}")
        for r in missed:
            print(f"    missed: {r['world_size']} GPUs {r['mode']}: {r['ratio_to_plain']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer rounds (CPU: tiny shapes)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--rows", type=int, help="rows per rank")
    p.add_argument("--seeds", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--telemetry-every", type=int, default=1)
    p.add_argument("--rounds", type=int)
    p.add_argument("--reps", type=int, default=10, help="steps per block")
    p.add_argument("--warmup", type=int)
    p.add_argument("--baseline-ms", type=float, help="the 1-GPU plain step, for efficiency")
    p.add_argument("--tag", default="", help="appended to the CSV's name")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    cuda, quick = args.device == "cuda", args.quick
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (KINDS.md)
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    if cuda:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    small = not cuda and quick
    hidden, rows = args.hidden or (64 if small else 4096), args.rows or (128 if small else 32768)
    seeds, dtype = args.seeds or (16 if small else 1024), DTYPES[args.dtype or "bf16"]
    rounds, warmup = args.rounds or (3 if quick else 7), args.warmup or (3 if small else 11)
    n, dev = max(1, round(0.1 * seeds)), args.device
    say = print if rank == 0 else (lambda *a, **k: None)
    gpu = torch.cuda.get_device_name() if cuda else "none (CPU)"
    say(f"{gpu} x {world}; {machine_name()}; torch {torch.__version__}; {dtype} {hidden} x "
        f"{rows} rows per rank, {seeds} seeds, {n} growing", flush=True)
    torch.manual_seed(0)  # the same model on every rank (DDP broadcasts rank 0's anyway)
    base = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    modes = {k: build(k, base, seeds, n, args.telemetry_every, dev, dtype, local)
             for k in MODES}
    gen = torch.Generator(device=dev).manual_seed(1000 + rank)  # each rank its own data
    xs = [torch.randn(rows, hidden, device=dev, generator=gen).to(dtype).requires_grad_()
          for _ in range(2)]
    gs = [(torch.randn(rows, hidden, device=dev, generator=gen) / rows).to(dtype)
          for _ in range(2)]
    for m in modes.values():
        for i in range(warmup):
            train_step(m, xs[i % 2], gs[i % 2])
    bad = check_ranks(modes, dev, rank, world)
    if bad:
        say(f"ABORT: ranks are not bit-identical after {warmup} steps:\n  " + "\n  ".join(bad))
        dist.destroy_process_group()
        return 1
    say(f"check: parameters and stage tables bit-identical on {world} rank(s) after {warmup}"
        f" steps, every mode", flush=True)
    times = torch.zeros(len(MODES), rounds, 2, dtype=torch.float64)
    for r in range(rounds):  # interleaved: drift of the machine hits every mode alike
        for j, m in enumerate(modes.values()):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            times[j, r] = torch.tensor(block(m, xs, gs, r * args.reps, args.reps, cuda)[:2])
    slow = times.to(dev)
    dist.all_reduce(slow, op=dist.ReduceOp.MAX)  # per block, the slowest rank's time
    med = {k: [statistics.median(slow[j, :, i].tolist()) for i in range(2)]
           for j, k in enumerate(MODES)}
    date = datetime.date.today().isoformat()
    tag = "cpu" if not cuda else gpu.lower().replace("nvidia", "").strip().replace(" ", "_")
    path = Path(args.out) / f"ddp_{tag}_{date}{'_quick' * quick}{args.tag}.csv"
    key = {"gpu": gpu, "dtype": str(dtype).removeprefix("torch."), "hidden": hidden,
           "rows_per_rank": rows, "seeds": seeds, "telemetry_every": args.telemetry_every}
    if rank == 0:
        one = {r["mode"]: float(r["step_ms"]) for r in csv_rows(path)
               if r["world_size"] == "1" and all(r[k] == str(v) for k, v in key.items())}
        one |= {"plain": args.baseline_ms} if args.baseline_ms else {}
        one = {k: med[k][0] * 1e3 for k in MODES} if world == 1 else one
        out = []
        for k, (step, fwd) in med.items():
            ms = step * 1e3
            out.append({"date": date, "machine": machine_name(), "torch": torch.__version__,
                        "world_size": world, "backend": dist.get_backend(), **key, "mode": k,
                        "active": len(modes[k].ids), "check": "ok", "step_ms": round(ms, 4),
                        "ratio_to_plain": round(step / med["plain"][0], 4),
                        "fwd_ms": round(fwd * 1e3, 4),
                        "scaling_eff": round(one[k] / ms, 4) if k in one else "",
                        "rounds": rounds, "reps": args.reps})
            print(f"{world} rank(s) {k:<9}{ms:>10.3f} ms  x{out[-1]['ratio_to_plain']:<7} fwd "
                  f"{out[-1]['fwd_ms']:>9.3f} ms  scaling eff {out[-1]['scaling_eff']}")
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out[0]))
            if new:
                w.writeheader()
            w.writerows(out)
        print(f"\nappended {len(out)} rows to {path}")
        bars(path, key)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
