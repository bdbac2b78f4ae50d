"""The training step of a whole model with seed layers, as users run it: a GPT-style decoder
(nanoGPT's block: LayerNorm, causal attention through one qkv `nn.Linear` and an output one,
LayerNorm, a 4x MLP), every block's four Linears wrapped by `kasmina.wrap`, the head not.
bench_step.py times one layer; a model pays each seed layer's host time once per layer per
step, and its GEMMs differ in shape (fc1 is 4x wide).

Modes (the same weights in each; timing, inputs and the paired ratio as bench_step.py: a fixed
random cotangent on the logits, SGD over the host's parameters, `layer.step()` for every seed
layer; modes interleaved in a new order each round):
- bare: the model unwrapped. bare2: a second copy of it (the run's noise floor).
- dormant / dormant10: wrapped, every seed dormant, telemetry every step / every 10th step.
- training / graft10: 10 % of every layer's seeds TRAINING / GRAFTING (residual_mlp,
  fixed_ramp), the rest dormant; the default KasminaConfig otherwise (cuda_graphs="auto").
- training_e / graft10_e: the same, every seed layer eager (cuda_graphs=False).
--profile MODE: afterwards, that mode's CUDA kernels over 3 steps (torch.profiler), by time.
Checked first: the dormant models' logits equal bare's bit for bit; growing ones are finite.

    python3 benchmarks/bench_model.py [--d 1024] [--layers 4] [--seq 512] [--batch 8]
        [--seeds 256] [--dtype bf16] [--modes bare,bare2,dormant,dormant10,training,graft10]
        [--rounds 9] [--reps 10] [--device cuda] [--tag _x]

Writes benchmarks/results/model_<gpu>_<date><tag>.csv (one row per mode).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import platform
import time
from pathlib import Path

import kasmina
import torch
import torch.nn.functional as F
from bench_step import BP, DTYPES, S, interleaved, paired_ratio, train_step
from kasmina import KasminaConfig
from torch import nn

MODES = ("bare", "bare2", "dormant", "dormant10", "training", "graft10", "training_e",
         "graft10_e")


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)  # (B, H, T, dh)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


class Mode:  # what bench_step's train_step and block take
    def __init__(self, model: nn.Module, after) -> None:  # noqa: ANN001
        self.model, self.after = model, after
        self.opts = [torch.optim.SGD(kasmina.host_parameters(model), lr=1e-4)]


def seeded(bare: nn.Module, seeds: int, every: int, stages: tuple) -> nn.Module:
    """A wrapped copy: in every seed layer 10 % of the seeds moved through `stages`."""
    model = copy.deepcopy(bare)
    n = max(1, round(0.1 * seeds))
    cfg = KasminaConfig(max_active_seeds=n, bank_slots=n, telemetry_every=every,
                        blueprints=(BP,))
    kasmina.wrap(model, seeds_per_layer=seeds, config=cfg, exclude=("head",))
    for layer in kasmina.seed_layers(model):
        ids = torch.linspace(0, layer.num_seeds - 1, n).round().long().tolist() if stages else []
        with layer.batch():
            for s in ids:
                layer.germinate(s, BP, "fixed_ramp")
                for stage in stages:
                    layer.transition(s, stage, force=True)
        layer.drain_events()
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seeds", type=int, default=256, help="seeds per wrapped Linear")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tag", default="")
    p.add_argument("--profile", default="", metavar="MODE")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (pass --device cpu to test the script)")
    torch.backends.cuda.matmul.allow_tf32 = True
    dev, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    bare = GPT(args.vocab, args.d, args.layers, args.heads, args.seq)
    loss = torch.zeros((), device=dev)
    builds = {"bare": lambda: copy.deepcopy(bare), "bare2": lambda: copy.deepcopy(bare),
              "dormant": lambda: seeded(bare, args.seeds, 1, ()),
              "dormant10": lambda: seeded(bare, args.seeds, 10, ()),
              "training": lambda: seeded(bare, args.seeds, 1, (S.TRAINING,)),
              "graft10": lambda: seeded(bare, args.seeds, 1, (S.TRAINING, S.GRAFTING))}
    builds |= {f"{k}_e": builds[k] for k in ("training", "graft10")}
    modes = {}
    for name in args.modes.split(","):
        model = builds[name]().to(device=dev, dtype=dtype).train()
        layers = kasmina.seed_layers(model)
        for layer in layers if name.endswith("_e") else ():
            layer.set_cuda_graphs(False)
        modes[name] = Mode(model, lambda layers=layers: [lay.step(loss) for lay in layers])
    gen = torch.Generator(device=dev).manual_seed(1)
    shape = (args.batch, args.seq)
    xs = [torch.randint(args.vocab, shape, device=dev, generator=gen) for _ in range(2)]
    gs = [(torch.randn(*shape, args.vocab, device=dev, generator=gen)
           / math.prod(shape)).to(dtype) for _ in range(2)]
    with torch.no_grad():  # correctness first
        want = modes["bare"].model(xs[0]) if "bare" in modes else None
        for name, m in modes.items():
            out = m.model(xs[0])
            assert torch.isfinite(out).all(), f"{name}: non-finite logits"
            if want is not None and name.startswith(("bare", "dormant")):
                assert torch.equal(out, want), f"{name}: not the bare model's logits"
    print(f"checks passed: {', '.join(modes)}", flush=True)
    times = interleaved(modes, xs, gs, 2, args.reps, cuda)  # warm-up (compiles, autotunes)
    times = interleaved(modes, xs, gs, args.rounds, args.reps, cuda)
    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    rows = []
    for name, ts in times.items():
        step = sorted(t[0] for t in ts)[len(ts) // 2]
        ratio = paired_ratio(times, name, "bare") if "bare" in times else float("nan")
        rows.append({"gpu": gpu, "dtype": args.dtype,
                     "d": args.d, "layers": args.layers, "rows": math.prod(shape),
                     "seeds_per_layer": args.seeds, "mode": name,
                     "seed_layers": len(kasmina.seed_layers(modes[name].model)),
                     "step_ms": round(step * 1e3, 3), "ratio_to_bare": round(ratio, 4),
                     "cpu_ms": round(sorted(t[2] for t in ts)[len(ts) // 2] * 1e3, 3)})
        print(f"{args.dtype} d {args.d} x {args.layers} blocks, {math.prod(shape)} tokens, "
              f"{args.seeds} seeds a layer  {name:<10} {rows[-1]['step_ms']:8.3f} ms  "
              f"x{rows[-1]['ratio_to_bare']:<7} cpu {rows[-1]['cpu_ms']:.3f} ms  "
              f"({rows[-1]['seed_layers']} seed layers)", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        m = modes[args.profile]
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for i in range(3):
                train_step(m, xs[i % 2], gs[i % 2])
            torch.cuda.synchronize()
        print(f"==== {args.profile}: per 3 steps")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25,
                                        max_name_column_width=70))
    tag = gpu.lower().replace("nvidia", "").strip().replace(" ", "_") if cuda else "cpu"
    path = Path(args.out) / f"model_{tag}_{time.strftime('%Y-%m-%d')}{args.tag}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
