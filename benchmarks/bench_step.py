"""The whole training step as users pay it (BENCHMARKS.md), modes side by side in one run:
forward, backward (the input requires grad), the host optimizer's step (SGD over the host's
parameters only) and, for seed layers, `layer.step()`. The gradient is a fixed random cotangent
(`out.backward(g)`, g scaled as a mean over rows): no loss kernels in any mode; `layer.step`
gets a device scalar as the loss.

Modes (n = max(1, round(0.1 * seeds)) seeds, spread evenly over the layer; telemetry every
step except in dormant10):
- bare: the host nn.Linear alone. bare2: another copy of it, timed as a mode like the others:
  its ratio to bare is the run's noise floor. bare_g: the host under
  torch.cuda.make_graphed_callables (forward and backward replayed as CUDA graphs), the baseline
  of the graphed modes (column ratio_to_bare_g). dormant / dormant10: every seed dormant,
  telemetry every step / every 10th step.
- training, graft10 ("10 %"): n seeds TRAINING / GRAFTING (fixed_ramp); max_active_seeds =
  bank_slots = n, so every slot of the bank is in use; the default KasminaConfig, so
  cuda_graphs="auto" (graphed where the host's GEMM is small: kasmina/graphs.py AUTO_MACS).
- training_e, graft10_e: the same layers eager (cuda_graphs=False).
- training_g, graft10_g: the same layers with cuda_graphs=True (the layer's forward,
  backward and step replayed as CUDA graphs at every shape).
- training_gp, graft10_gp: the same layers on the general path (a no-op forward hook on the
  host rules out kasmina.fused, the one-node Linear path): what that node saves.
- graft100 ("100 %"): every seed GRAFTING, max_active_seeds = bank_slots = seeds (the kernel
  table's 100 % active row). 100 % of a budget of n would be graft10 again, so "of the active
  budget" is read as "of the seeds".
- loop: a naive user's layer: a Python loop over the same n seeds, each its own float32
  residual-MLP nn.Module (the catalog's hidden width) on its chunk (input detached, as
  isolate_host_in_blend), blended with a Python-float alpha; Adam over the blueprints; no
  telemetry (which favours the loop).
- compile: torch.compile of the graft10 layer (layer.step eager), at the bars' seed count only.
- compile_ro: the same with mode="reduce-overhead" (CUDA graphs through Inductor's cudagraph
  trees), against the same eager bare host step.
"Growing step" in the bars = training and graft10 at 1,024 seeds (else the largest count run).

Checks, before each case is timed: dormant and training outputs bit-identical to the host
(torch.equal); graft10, graft100, loop and compile close to a float64 formula
(1 - a) h + a (h + W2 gelu(W1 h + b1) + b2), known weights, after 12 ramp steps; NaN never
passes (every blueprint poisoned: the output is exactly the host's, and the seeds roll back at
the epoch boundary). A wrong output is reported (exit status 1) and its mode still timed.

Timing: warm-up (11 steps), then `rounds` rounds of one block of `reps` steps per mode (10: one
telemetry step a block at every 10th), in a new (seeded) order each round; inputs rotate over
2-8 tensors (past L2). Per mode: step time (median over blocks of the block mean, CUDA events),
ratio to bare (median over rounds of the block's ratio to bare's block in the same round),
forward time (events around the forward inside the step) and overhead over bare's, host CPU time
per step (process CPU time while the steps are enqueued, before the final sync), kernels per
step and GPU busy fraction (one torch.profiler pass per case; memcpy/memset add to busy time,
not to kernels; busy: see `profile`). On the CPU (a test of the script, not a measurement)
kernels = top-level aten ops, busy is blank. Writes benchmarks/results/step_<gpu>_<date>.csv
after every case (the bars' seed count and larger layers first, so a run cut short keeps the
bars' cases); prints the bars last.

    python3 benchmarks/bench_step.py [--quick] [--check-only] [--shapes 4096x32768,...]
        [--seeds 64,1024] [--dtypes bf16,fp32] [--modes bare,graft10] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import gc
import math
import operator
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from kasmina import KasminaConfig, KasminaLayer, SeedStage, get_blueprint, split_chunks
from torch import nn
from torch.autograd import DeviceType

MODES = ("bare", "bare2", "bare_g", "dormant", "dormant10", "training", "graft10", "training_e",
         "graft10_e", "training_g", "graft10_g", "training_gp", "graft10_gp", "graft100", "loop",
         "compile", "compile_ro")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BP, RAMP, TAG, S = "residual_mlp", 12, "bench_step::", SeedStage


def base(mode: str) -> str:
    """The layer a mode times: graft10_e, graft10_g and graft10_gp are graft10's."""
    return mode.removesuffix("_gp").removesuffix("_g").removesuffix("_e")


def machine_name() -> str:
    cpu = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model n")]
    return f"{cpu[0].split(':', 1)[1].strip() if cpu else '?'} ({torch.get_num_threads()} threads)"


def config(n: int, every: int) -> KasminaConfig:
    new = {"bank_slots": n, "blueprints": (BP,)}  # fields of the refactor, where present
    return KasminaConfig(max_active_seeds=n, telemetry_every=every, **{
        k: v for k, v in new.items() if k in KasminaConfig.__dataclass_fields__})


def build_layer(host: nn.Linear, seeds: int, n: int, every: int, stages: tuple) -> tuple:
    """(layer, seed ids): `n` seeds germinated and moved through `stages`, committed once."""
    ids = torch.linspace(0, seeds - 1, n).round().long().tolist() if stages else []
    layer = KasminaLayer(copy.deepcopy(host), seeds, config(n, every))
    with layer.batch():
        for s in ids:
            layer.germinate(s, BP, "fixed_ramp")
            for stage in stages:
                layer.transition(s, stage, force=True)
    assert not stages or layer.seeds_in(stages[-1]) == ids, layer.stage_counts
    layer.drain_events()
    return layer, ids


class SeedLoop(nn.Module):
    """The per-seed loop a naive user writes (see the module docstring)."""

    def __init__(self, host: nn.Linear, seeds: int, ids: list[int]) -> None:
        super().__init__()
        self.host, self.ramp, hid = host, config(1, 1).ramp_steps, get_blueprint(BP).hidden
        self.spans = [split_chunks(host.out_features, seeds)[s] for s in ids]
        self.bps = nn.ModuleList(nn.Sequential(nn.Linear(hi - lo, hid), nn.GELU(),
                                               nn.Linear(hid, hi - lo)) for lo, hi in self.spans)
        self.alpha = [0.0] * len(ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)
        out = h.clone()
        for (lo, hi), bp, a in zip(self.spans, self.bps, self.alpha, strict=True):
            c = h[:, lo:hi].detach().float()
            out[:, lo:hi] = ((1 - a) * h[:, lo:hi] + a * (c + bp(c))).to(h.dtype)
        return out

    def after(self) -> None:
        self.alpha = [min(1.0, a + 1.0 / self.ramp) for a in self.alpha]


class GraphedBare(nn.Module):
    """bare_g: the host under torch.cuda.make_graphed_callables, captured at its first call (on
    the CPU, the host itself)."""

    def __init__(self, host: nn.Linear) -> None:
        super().__init__()
        self.host, self.fn = host, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return self.host(x)
        if self.fn is None:
            sample = x.detach().clone().requires_grad_(x.requires_grad)
            self.fn = torch.cuda.make_graphed_callables(self.host, (sample,))
        return self.fn(x)


class Mode:
    def __init__(self, model, host, opts, after, layer=None, ids=(), every=1) -> None:  # noqa: ANN001
        self.model, self.host, self.opts, self.after = model, host, opts, after
        self.layer, self.ids, self.every = layer, list(ids), every


def make_modes(tpl: dict, seeds: int, dtype: torch.dtype, dev: str, want: set) -> dict:
    def to(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module).to(device=dev, dtype=dtype)  # a layer: the host's dtype

    loss, modes, sgd = torch.zeros((), device=dev), {}, lambda mod: torch.optim.SGD(
        mod.parameters(), lr=1e-3)
    for name in sorted(want, key=MODES.index):
        if name in ("bare", "bare2", "bare_g"):
            host = to(tpl["host"])
            model = GraphedBare(host) if name == "bare_g" else host
            modes[name] = Mode(model, host, [sgd(host)], lambda: None)
        elif name == "loop":
            loop = SeedLoop(to(tpl["host"]), seeds, tpl["graft10"][1]).to(dev)  # float32 bps
            modes[name] = Mode(loop, loop.host, [sgd(loop.host), torch.optim.Adam(
                loop.bps.parameters(), lr=1e-3)], loop.after, loop, tpl["graft10"][1])
        else:
            layer, ids = tpl["graft10" if name.startswith("compile") else base(name)]
            layer = to(layer)
            if name.endswith(("_g", "_e")):
                layer.set_cuda_graphs(name.endswith("_g"))
            if name.endswith("_gp"):  # a forward hook on the host rules out kasmina.fused
                layer.host.register_forward_hook(lambda *_: None)
            model = (torch.compile(layer) if name == "compile" else torch.compile(
                layer, mode="reduce-overhead") if name == "compile_ro" else layer)
            modes[name] = Mode(model,
                               layer.host, [sgd(layer.host)], lambda layer=layer: layer.step(loss),
                               layer, ids, layer.config.telemetry_every)
    return modes


def train_step(m: Mode, x: torch.Tensor, g: torch.Tensor, stamp=None, i: int = 0) -> None:  # noqa: ANN001
    for opt in m.opts:
        opt.zero_grad(set_to_none=True)
    x.grad = None
    out = m.model(x)
    if stamp is not None:  # the forward's end
        stamp(i)
    out.backward(g)
    for opt in m.opts:
        opt.step()
    m.after()


def block(m: Mode, xs: list, gs: list, k0: int, reps: int, cuda: bool) -> tuple:
    """(step s, forward s, host CPU s), means over `reps` steps. Time stamps: CUDA events made
    before the block, or perf_counter on the CPU (stamped in index order)."""
    t = [torch.cuda.Event(enable_timing=True) for _ in range(2 * reps + 1)] if cuda else []
    stamp = (lambda i: t[i].record()) if cuda else (lambda i: t.append(time.perf_counter()))
    c0 = time.process_time()
    for i in range(reps):
        stamp(2 * i)
        train_step(m, xs[(k0 + i) % len(xs)], gs[(k0 + i) % len(xs)], stamp, 2 * i + 1)
    stamp(2 * reps)
    cpu = time.process_time() - c0
    if cuda:
        t[-1].synchronize()
    sec = (lambda i, j: t[i].elapsed_time(t[j]) / 1e3) if cuda else (lambda i, j: t[j] - t[i])
    fwd = sum(sec(2 * i, 2 * i + 1) for i in range(reps))
    return sec(0, 2 * reps) / reps, fwd / reps, cpu / reps


def interleaved(modes: dict, xs: list, gs: list, rounds: int, reps: int, cuda: bool) -> dict:
    """mode -> one `block` a round, the modes in a new (seeded) order each round: in a fixed
    order (or one rotated a mode a round) bare2 always followed bare and read 1.068-1.074x it
    at 4096 x 32768 (s7d, s8a), 0.73x at 1024 x 8192: the same module timed twice."""
    times, order, rng = {name: [] for name in modes}, list(modes.items()), random.Random(0)
    for r in range(rounds):
        rng.shuffle(order)
        for name, m in order:
            times[name].append(block(m, xs, gs, r * reps, reps, cuda))
    return times


def paired_ratio(times: dict, name: str, ref: str) -> float:
    """The median over rounds of a mode's step time over `ref`'s in the same round."""
    return statistics.median(a[0] / b[0] for a, b in zip(times[name], times[ref], strict=True))


def reference(h: torch.Tensor, chunks: list, ids: list, a: float, w: dict) -> torch.Tensor:
    """float64 (1 - a) h + a bp(h) on the seeds' chunks, h elsewhere."""
    h, w = h.double(), {k: v.to(h.device) for k, v in w.items()}
    out, by_width = h.clone(), {}
    for s in ids:
        by_width.setdefault(chunks[s][1] - chunks[s][0], []).append(chunks[s][0])
    for c, starts in by_width.items():
        idx = torch.tensor(starts, device=h.device)[:, None] + torch.arange(c, device=h.device)
        xc = h[:, idx]  # (R, seeds of this width, c)
        bp = xc + F.gelu(xc @ w["w1"][:c] + w["b1"]) @ w["w2"][:, :c] + w["b2"][:c]
        out[:, idx] = (1 - a) * xc + a * bp
    return out


def check(name: str, m: Mode, x: torch.Tensor, g: torch.Tensor, chunks: list) -> None:
    """Raises on a wrong output (see the module docstring)."""
    if name in ("bare", "bare2", "dormant", "dormant10", "training"):
        out = m.model(x)
        assert torch.isfinite(out).all(), "non-finite output"
        assert name.startswith("bare") or torch.equal(out, m.host(x)), "not bit-identical"
        return
    for _ in range(RAMP):  # alpha = RAMP / ramp_steps; no gradients yet: weights unchanged
        m.after()
    gen = torch.Generator().manual_seed(1)
    w = {k: torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(s[0])
         for k, s in get_blueprint(BP).shapes(max(e - s for s, e in chunks)).items()}
    with torch.no_grad():  # the same weights in every seed; bank parameters are (slots, *shape)
        loop = isinstance(m.layer, SeedLoop)
        for (lo, hi), bp in zip(m.layer.spans, m.layer.bps, strict=True) if loop else ():
            bp[0].weight.copy_(w["w1"][:hi - lo].T), bp[0].bias.copy_(w["b1"])
            bp[2].weight.copy_(w["w2"][:, :hi - lo].T), bp[2].bias.copy_(w["b2"][:hi - lo])
        for bank in () if loop else m.layer.banks.values():
            for key, p in bank.params.items():  # named (slots, *shape) views of the bank
                v = w.get(key)
                assert v is not None and p.shape[1:] == v.shape, f"bank layout? {key} {p.shape}"
                p.copy_(v.expand_as(p))
    rows = min(x.shape[0], 1024)
    out = m.model(x)[:rows].double()
    want = reference(m.host(x)[:rows].detach(), chunks, m.ids, RAMP / config(1, 1).ramp_steps, w)
    tol = 2e-2 if x.dtype == torch.bfloat16 else 5e-3  # bf16 output; TF32 blueprint matmuls
    assert torch.isfinite(out).all(), "non-finite output"
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    if name == "graft10":  # NaN never passes
        bad = copy.deepcopy(m.layer)
        with torch.no_grad():
            for key, p in bad.named_parameters():
                if not key.startswith("host."):
                    p.fill_(float("nan"))
        out = bad(x)
        assert torch.equal(out, bad.host(x)), "poisoned seeds changed the output"
        out.backward(g)
        bad.step(torch.zeros((), device=x.device))
        bad.end_epoch(None)
        assert bad.seeds_in(S.ROLLED_BACK) == m.ids, f"not rolled back: {bad.stage_counts}"


def profile(modes: dict, xs: list, gs: list, cuda: bool) -> dict:
    """mode -> (kernels per step, GPU busy fraction), one profiler session. Busy = the
    device time of a mode's kernels over their span (the first one's start to the last one's
    end, over its steps): both under the same clocks (against the timed step, a kernel sum from
    this session read bare2 at 0.88 and bare at 1.01 in s7d). Under the profiler the host's
    CPU time per op grows, so where the CPU is the limit this reads low."""
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    steps = {k: (m.every if m.every > 1 else 1 if k == "loop" else 3) for k, m in modes.items()}
    with torch.profiler.profile(activities=acts) as prof:
        # The first mode profiled read low (bare 0.85-0.93 busy at 4096 x 32768, its copy bare2
        # 0.99: s12): a step of it outside every span first, so the profiler's own start-up
        # is not billed to a mode.
        lead = next(iter(modes.values()))
        train_step(lead, xs[0], gs[0])
        if cuda:
            torch.cuda.synchronize()
        time.sleep(0.002)
        for name, m in modes.items():
            with torch.profiler.record_function(TAG + name):
                for i in range(steps[name]):
                    train_step(m, xs[i % len(xs)], gs[i % len(gs)])
                if cuda:
                    torch.cuda.synchronize()
            time.sleep(0.002)  # a gap: device events are given to spans by their start time
    events = prof.events()
    spans = {e.name[len(TAG):]: (e.time_range.start - 500, e.time_range.end + 500)
             for e in events if e.name.startswith(TAG) and e.device_type == DeviceType.CPU}
    count, busy = dict.fromkeys(spans, 0), dict.fromkeys(spans, 0.0)
    first, last = dict.fromkeys(spans, math.inf), dict.fromkeys(spans, -math.inf)
    for e in events:
        top = e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
        if e.name.startswith(TAG) or getattr(e, "is_user_annotation", False) or (
                e.device_type != DeviceType.CUDA if cuda else not (
                    e.name.startswith("aten::") and top)):
            continue
        for name, (a, b) in spans.items():
            if a <= e.time_range.start <= b:
                count[name] += not e.name.startswith(("Memcpy", "Memset"))
                busy[name] += e.time_range.elapsed_us()
                first[name] = min(first[name], e.time_range.start)
                last[name] = max(last[name], e.time_range.end)
                break
    return {k: (count[k] / steps[k], busy[k] / max(last[k] - first[k], 1e-9)) for k in spans}


def run_case(tpl: dict, hidden: int, rows: int, seeds: int, dtype: torch.dtype, args,  # noqa: ANN001
             want: set, meta: dict) -> tuple[list, list]:
    dev, cuda = args.device, args.device == "cuda"
    torch._dynamo.reset()  # each case compiles anew (dynamo's recompile limit is per code)
    chunks, modes = split_chunks(hidden, seeds), make_modes(tpl, seeds, dtype, dev, want)
    k = 1 if args.check_only else min(8, max(2, math.ceil(
        256 * 2**20 / (rows * hidden * torch.finfo(dtype).bits // 8))))  # >= 256 MiB of x
    gen = torch.Generator(device=dev).manual_seed(rows + hidden + seeds)
    xs = [torch.randn(rows, hidden, device=dev, generator=gen).to(dtype).requires_grad_()
          for _ in range(k)]
    gs = [(torch.randn(rows, hidden, device=dev, generator=gen) / rows).to(dtype)
          for _ in range(k)]
    label = f"{str(dtype).removeprefix('torch.'):<9}{hidden:>5} x {rows:<6} seeds {seeds:<5}"
    status, failures = {}, []
    for phase in ("check", "warm-up"):
        for name, m in list(modes.items()):
            try:
                if phase == "check":
                    check(base(name), m, xs[0], gs[0], chunks)
                    status[name] = "ok"
                elif not args.check_only:
                    for i in range(args.warmup):
                        train_step(m, xs[i % k], gs[i % k])
            except Exception as e:  # reported; a mode that raised (not a wrong output) stops
                msg = f"FAILED {phase}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
                status[name] = msg if status.get(name, "ok") == "ok" else status[name]
                failures.append(f"{label} {name}: {msg}")
                if phase != "check" or not isinstance(e, AssertionError):
                    del modes[name]
    print(f"{label} checks: " + ", ".join(f"{k} {v}" for k, v in status.items()), flush=True)
    if args.check_only:
        return [], failures
    times = interleaved(modes, xs, gs, args.rounds, args.reps, cuda)
    prof = profile(modes, xs, gs, cuda)
    med = {n: [statistics.median(t[i] for t in ts) for i in range(3)] for n, ts in times.items()}

    def paired(name: str, ref: str) -> float | str:
        return round(paired_ratio(times, name, ref), 4) if ref in times else ""

    bare, ours, out = med.get("bare"), med.get("graft10"), []
    for name, (step, fwd, cpu) in med.items():
        (kern, busy), m = prof.get(name, (math.nan, math.nan)), modes[name]
        out.append({
            **meta, "dtype": str(dtype).removeprefix("torch."), "hidden": hidden, "rows": rows,
            "seeds": seeds, "mode": name, "active": len(m.ids),
            "telemetry_every": m.every if isinstance(m.layer, KasminaLayer) else "",
            "check": status[name], "step_ms": round(step * 1e3, 4),
            "ratio_to_bare": paired(name, "bare"), "ratio_to_bare_g": paired(name, "bare_g"),
            "over_ours": paired(name, "graft10") if ours and name in ("loop", "compile",
                                                                      "compile_ro") else "",
            "fwd_us": round(fwd * 1e6, 1),
            "fwd_overhead_us": round((fwd - bare[1]) * 1e6, 1) if bare else "",
            "kernels_per_step": round(kern, 1), "cpu_ms_per_step": round(cpu * 1e3, 3),
            "gpu_busy": round(busy, 3) if cuda else "",
            "rounds": args.rounds, "reps": args.reps})
        r = out[-1]
        print(f"{label} {name:<10}{r['step_ms']:>10.3f} ms  x{r['ratio_to_bare']:<7} fwd "
              f"+{r['fwd_overhead_us']:>8} us {r['kernels_per_step']:>7} kernels  cpu "
              f"{r['cpu_ms_per_step']:>8.3f} ms  busy {r['gpu_busy']}", flush=True)
    return out, failures


def bars(rows: list, big: str, small: str, bs: int) -> None:
    def shape(r: dict) -> str:
        return f"{r['hidden']}x{r['rows']}"

    def growing(r: dict, modes: tuple = ("training", "graft10")) -> bool:
        return r["mode"] in modes and r["seeds"] == bs

    def graphed(r: dict) -> bool:
        return growing(r, ("training_g", "graft10_g"))

    def eager(r: dict) -> bool:
        return growing(r, ("training_e", "graft10_e"))

    table = [  # (what, op, limit, column, which rows)
        (f"growing step / bare, {big} bf16, {bs} seeds", "<=", 1.15, "ratio_to_bare",
         lambda r: growing(r) and shape(r) == big and r["dtype"] == "bfloat16"),
        (f"growing step / bare, {small} bf16, {bs} seeds", "<=", 1.5, "ratio_to_bare",
         lambda r: growing(r) and shape(r) == small and r["dtype"] == "bfloat16"),
        (f"growing step / bare, {big} bf16, eager", "<=", 1.15, "ratio_to_bare",
         lambda r: eager(r) and shape(r) == big and r["dtype"] == "bfloat16"),
        (f"growing step / bare, {small} bf16, eager", "<=", 1.5, "ratio_to_bare",
         lambda r: eager(r) and shape(r) == small and r["dtype"] == "bfloat16"),
        (f"growing step / bare, {big} bf16, cuda_graphs", "<=", 1.15, "ratio_to_bare",
         lambda r: graphed(r) and shape(r) == big and r["dtype"] == "bfloat16"),
        (f"growing step / bare, {small} bf16, cuda_graphs", "<=", 1.5, "ratio_to_bare",
         lambda r: graphed(r) and shape(r) == small and r["dtype"] == "bfloat16"),
        ("dormant / bare, every shape, telemetry every 10th", "<=", 1.03, "ratio_to_bare",
         lambda r: r["mode"] == "dormant10"),
        (f"dormant / bare, {big}, telemetry every step", "<=", 1.05, "ratio_to_bare",
         lambda r: r["mode"] == "dormant" and shape(r) == big),
        (f"forward overhead (us), {big}, dormant and growing", "<", 100, "fwd_overhead_us",
         lambda r: shape(r) == big and (r["mode"] in ("dormant", "dormant10") or growing(r))),
        ("GPU busy fraction, growing step, every shape", ">=", 0.8, "gpu_busy", growing),
        ("GPU busy fraction, growing step, eager", ">=", 0.8, "gpu_busy", eager),
        ("GPU busy fraction, growing step, cuda_graphs", ">=", 0.8, "gpu_busy", graphed),
        (f"per-seed loop / ours (graft10), every shape, {bs} seeds", ">=", 10, "over_ours",
         lambda r: r["mode"] == "loop" and r["seeds"] == bs),
    ]
    print(f"\nbars (BENCHMARKS.md), this run:\n{'bar':<60}{'target':>9}{'worst':>10}"
          f"{'rows':>6}  verdict")
    for what, op, limit, col, which in table:
        got = [(r[col], r) for r in rows if which(r) and r[col] != ""]
        cmp = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}[op]
        missed = [(v, r) for v, r in got if not cmp(v, limit) or r["check"] != "ok"]
        worst = (min if op == ">=" else max)(v for v, _ in got) if got else ""
        verdict = "no data" if not got else "missed" if missed else "met"
        print(f"{what:<60}{op + ' ' + str(limit):>9}{worst:>10}{len(got):>6}  {verdict}")
        for v, r in missed:
            print(f"    missed: {r['dtype']} {shape(r)} seeds {r['seeds']} {r['mode']}: {v}"
                  f"{'' if r['check'] == 'ok' else ' (check failed)'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a subset of the matrix, 2 rounds")
    p.add_argument("--check-only", action="store_true", help="the correctness checks only")
    p.add_argument("--shapes", help="HIDDENxROWS,... (default: the device's matrix)")
    p.add_argument("--seeds", help="seed counts, comma-separated")
    p.add_argument("--dtypes", help="of bf16,fp32")
    p.add_argument("--modes", help=f"of {','.join(MODES)} (bare always runs)")
    p.add_argument("--rounds", type=int)
    # (blocks of 20-30 steps, ~20 ms, at 1024 x 8192 did not narrow bare2's spread there: s9)
    p.add_argument("--reps", type=int, default=10, help="steps per block (a multiple of 10)")
    p.add_argument("--tag", default="", help="appended to the CSV's name")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    cuda, quick = args.device == "cuda", args.quick
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        shapes = "1024x8192,4096x32768" if quick else "1024x8192,1024x32768,4096x8192,4096x32768"
        seeds, dtypes = ("1024", "bf16") if quick else ("64,1024,4096", "bf16,fp32")
    else:  # a test of the script, not a measurement: tiny shapes, one thread (a shared machine)
        torch.set_num_threads(1)
        shapes, seeds, dtypes = "64x128,128x256", "16,64", "fp32,bf16"
    shapes = [tuple(map(int, s.split("x"))) for s in (args.shapes or shapes).split(",")]
    seeds_list = [int(s) for s in (args.seeds or seeds).split(",")]
    dtypes = [DTYPES[d] for d in (args.dtypes or dtypes).split(",")]
    want = set(args.modes.split(",")) | {"bare"} if args.modes else set(MODES)
    assert want <= set(MODES), f"unknown modes {want - set(MODES)}"
    if not cuda and quick and not args.modes:
        want -= {"compile", "compile_ro"}  # CPU Inductor: ~50 s a graph on 2 cores; --modes adds it
    args.rounds, args.warmup = args.rounds or (2 if quick else 15), 2 if quick and not cuda else 11
    bs = 1024 if 1024 in seeds_list else max(seeds_list)
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name() if cuda else "none (CPU)"
    meta = {"date": datetime.date.today().isoformat(), "machine": machine_name(), "gpu": gpu,
            "torch": torch.__version__}
    print(f"{gpu}; {meta['machine']}; torch {torch.__version__}", flush=True)
    tag = "cpu" if not cuda else gpu.lower().replace("nvidia", "").strip().replace(" ", "_")
    path = Path(args.out) / f"step_{tag}_{meta['date']}{'_quick' * quick}{args.tag}.csv"
    rows, failures, t0 = [], [], time.perf_counter()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout`: keep what is done
    try:
        for seeds in sorted(set(seeds_list), key=lambda s: (s != bs, s)):  # the bars' first
            for hidden in sorted({h for h, _ in shapes if h >= seeds}, reverse=True):
                n, host, grow = max(1, round(0.1 * seeds)), nn.Linear(hidden, hidden), S.GRAFTING
                stages = {"dormant": (n, 1, ()), "dormant10": (n, 10, ()), "graft10": (
                    n, 1, (S.TRAINING, grow)), "training": (n, 1, (S.TRAINING,)),
                    "graft100": (seeds, 1, (S.TRAINING, grow))}
                tpl = {"host": host} | {k: build_layer(host, seeds, *v) for k, v in stages.items()
                                        if k in want | {"graft10"} or f"{k}_g" in want}
                for dtype in dtypes:  # the templates are on the CPU, copied to each case
                    for n_rows in (r for h, r in shapes if h == hidden):
                        modes = want - (set() if seeds == bs else {"compile", "compile_ro"})
                        out, bad = run_case(tpl, hidden, n_rows, seeds, dtype, args, modes, meta)
                        rows, failures = rows + out, failures + bad
                        gc.collect()
                        if cuda:
                            torch.cuda.empty_cache()
                        if rows:  # after every case, so a run cut short keeps its rows
                            path.parent.mkdir(parents=True, exist_ok=True)
                            with path.open("w", newline="") as f:
                                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                                w.writeheader()
                                w.writerows(rows)
                        print(f"  ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    except KeyboardInterrupt:
        failures.append(f"interrupted after {time.perf_counter() - t0:.0f} s: partial matrix")
    if rows:
        print(f"\nwrote {path}")
        bars(rows, "x".join(map(str, max(shapes))), "x".join(map(str, min(shapes))), bs)
    print(f"\n{len(failures)} failure(s)" + "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
