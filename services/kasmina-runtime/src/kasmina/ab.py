"""`python -m kasmina ab`: the A/B harness of the migration (issue #14, DESIGN §9). The digits
job (recipes.py, grown by the `LocalController` as `python -m kasmina demo` does) runs on the
legacy path and on the chunked path, paired: for each random seed the same model init, data order
and seeds on both, interleaved (legacy seed 0, chunked seed 0, legacy seed 1, ...) so drift in
the machine's speed falls on both paths alike. Writes report.md (quality and speed per path, 95 %
confidence intervals, the sequential test's verdict), runs.csv and two plots into --out.

Both arms are the model a job built for the migration has: each seed layer a `DualPathLayer`
(`wrap(config=KasminaConfig(execution_path="legacy"))`), the chunked arm switched by
`request_path("chunked")` before its first step, as the `kasmina.execution_path` flag does. So
both hold the same parameters, initialised alike, and are the same function until the first
germination; what differs is the path that grows.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import torch
from scipy import stats  # scikit-learn's own dependency (the demo extra)
from torch import nn

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .controller import LocalController
from .dual import PATHS, DualPathLayer
from .layer import KasminaLayer
from .lifecycle import SeedStage
from .recipes import (
    DIGITS_CONTROLLER,
    DigitsParams,
    EpochRecord,
    build_model,
    load_digits_split,
    train_digits,
)

# `python -m kasmina demo`'s controller defaults (its argparse defaults in demo.py).
CONTROLLER = DIGITS_CONTROLLER
ORDER = ("legacy", "chunked")  # control first, then treatment, for each seed
assert set(ORDER) == set(PATHS)
COLUMNS = ("path", "seed", "test_accuracy", "pre_germination_val_loss", "germinated",
           "fossilized", "culled", "rolled_back", "params_added", "step_ms", "wall_s")


@dataclasses.dataclass
class PathRun:
    path: str
    seed: int
    test_accuracy: float
    pre_germination_val_loss: float  # the last boundary's metric before any seed germinated
    germinated: int
    fossilized: int
    culled: int
    rolled_back: int
    params_added: int  # by the fossilised blueprints, both paths' (recipes.RunResult)
    step_ms: float  # median over the run's training steps
    wall_s: float


class _TimedSteps:
    """The controller, timing each training step: from one `step` call to the next within an
    epoch (forward, backward, the host's and the seeds' optimizer steps); the epoch boundaries
    (validation, the controller's policy) are left out."""

    def __init__(self, controller: LocalController) -> None:
        self.controller = controller
        self.seconds: list[float] = []
        self._last: float | None = None

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        self.controller.step(loss)
        now = time.perf_counter()
        if self._last is not None:
            self.seconds.append(now - self._last)
        self._last = now

    def end_epoch(self, val_metric: float, evaluate: Callable[[], float] | None = None
                  ) -> object:
        events = self.controller.end_epoch(val_metric, evaluate)
        self._last = None
        return events


def build_dual_path(p: DigitsParams, path: str) -> nn.Module:
    """The recipe's model with each seed layer a DualPathLayer over the same host and config,
    on `path` (switched before the first step: at once)."""
    model = build_model(p)  # seeds torch's generator: the same init on both paths
    chunked = [(n, m) for n, m in model.named_modules() if isinstance(m, KasminaLayer)]
    for name, layer in chunked:
        dual = DualPathLayer(layer.host, layer.num_seeds,
                             layer.config.replace(execution_path="legacy"), layer.layer_id)
        dual.request_path(path)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dual)
    return model


def run_one(p: DigitsParams, path: str, data: dict[str, torch.Tensor]) -> PathRun:
    start = time.perf_counter()
    model = build_dual_path(p, path)
    timed = _TimedSteps(LocalController(model, CONTROLLER))
    moved: dict[SeedStage, int] = dict.fromkeys(SeedStage, 0)
    pre = [float("nan")]

    def on_epoch(record: EpochRecord, events: object, _snapshot: object) -> bool:
        if not moved[SeedStage.GERMINATED]:  # germination happens after the metric is taken
            pre[0] = record.val_loss
        for e in events or ():
            moved[e.to_stage] += 1
        return True

    result = train_digits(p, model, timed, data, on_epoch)
    return PathRun(path, p.seed, result.test_accuracy, pre[0], moved[SeedStage.GERMINATED],
                   moved[SeedStage.FOSSILIZED], moved[SeedStage.CULLED],
                   moved[SeedStage.ROLLED_BACK], result.params_added,
                   1e3 * statistics.median(timed.seconds), time.perf_counter() - start)


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the t-interval of the mean (n - 1 degrees of freedom)."""
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(
        len(values))
    return mean, mean - half, mean + half


def sequential_verdict(runs: list[PathRun]) -> str:
    """karn.sequential's verdict (the guarded rollout's test: always valid, CUPED on the
    pre-germination metric), chunked against legacy on test accuracy, when karn-feedback is
    installed; kasmina does not depend on it (a separate distribution)."""
    try:
        from karn.sequential import Moments, SequentialConfig, compare
    except ImportError:
        return ("not available: the sequential test is karn-feedback's (karn.sequential), "
                "which is not installed here; the paired 95 % CI above is the comparison")
    config = SequentialConfig()
    arms = [[r for r in runs if r.path == path] for path in ORDER]
    control, treatment = (Moments.of([r.test_accuracy for r in arm],
                                     [r.pre_germination_val_loss for r in arm]) for arm in arms)
    c = compare(control, treatment, config)
    detail = (f"chunked − legacy {float(c.estimate):+.4f}, always-valid "
              f"{100 * (1 - config.alpha):.0f} % interval [{float(c.lower):+.4f}, "
              f"{float(c.upper):+.4f}] (CUPED on the pre-germination validation loss, theta "
              f"{float(c.theta):.3f}; karn.sequential, mSPRT, alpha {config.alpha})")
    if not bool(c.ready):
        return (f"{c.verdict.value} (not ready: the test decides from "
                f"{config.min_jobs_per_path} runs per path, this has {len(arms[0])}); {detail}")
    return f"{c.verdict.value}; {detail}"


def plot(runs: list[PathRun], out: Path) -> None:
    """accuracy.png (test accuracy per seed, the pairs joined) and step_time.png (each run's
    median step time per path)."""
    seeds = sorted({r.seed for r in runs})
    value = {(r.path, r.seed): r for r in runs}
    fig, ax = plt.subplots(figsize=(7, 4))
    for path, marker in zip(ORDER, "os", strict=True):
        ax.plot(seeds, [value[path, s].test_accuracy for s in seeds], marker, label=path)
    ax.vlines(seeds, *np.array([[value[path, s].test_accuracy for s in seeds] for path in ORDER]),
              color="grey", linewidth=0.8)
    ax.set(xlabel="random seed", ylabel="final test accuracy", xticks=seeds,
           title="test accuracy per seed per path")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    times = [[r.step_ms for r in runs if r.path == path] for path in ORDER]
    ax.boxplot(times, showfliers=False)
    for i, ts in enumerate(times, 1):
        ax.plot(np.full(len(ts), i), ts, "o", alpha=0.6)
    ax.set_xticks(range(1, len(ORDER) + 1), ORDER)
    ax.set(ylabel="step time, ms (median per run)", title="step time per path")
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)
    plt.close(fig)


def _loads(load: tuple[float, ...]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def _fmt(values: np.ndarray, digits: int) -> tuple[str, str]:
    mean, low, high = t_interval(values)
    sd = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{mean:.{digits}f} ± {sd:.{digits}f}", f"[{low:.{digits}f}, {high:.{digits}f}]"


def render(runs: list[PathRun], args: argparse.Namespace, p: DigitsParams, wall_s: float,
           load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    by = {path: [r for r in runs if r.path == path] for path in ORDER}
    col = {path: {k: np.array([getattr(r, k) for r in rs], dtype=float) for k in COLUMNS[2:]}
           for path, rs in by.items()}
    diff = col["chunked"]["test_accuracy"] - col["legacy"]["test_accuracy"]
    step_diff = col["chunked"]["step_ms"] - col["legacy"]["step_ms"]
    n = len(by["legacy"])
    lines = [
        "# A/B: the legacy and the chunked execution path", "",
        f"The digits job (`kasmina.recipes`, {p.epochs} epochs, host 64 → {p.hidden} → "
        f"{p.bottleneck} → 10, {p.seeds_per_layer} seeds on the first layer, grown by the "
        f"LocalController with `python -m kasmina demo`'s settings), {n} paired runs: for each "
        "random seed the same model init, data order and seeds on both paths, run interleaved "
        "(legacy, chunked, next seed). Each seed layer is a `DualPathLayer`; the chunked arm "
        "switches before its first step.", "",
        "## Quality: final test accuracy", "",
        "| path | runs | mean ± sd | 95 % CI | germinated | fossilised | culled | rolled back "
        "| parameters added per run |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in ORDER:
        c = col[path]
        counts = " | ".join(f"{c[k].sum():.0f} ({c[k].mean():.1f}/run)"
                            for k in ("germinated", "fossilized", "culled", "rolled_back"))
        lines.append(f"| {path} | {n} | {' | '.join(_fmt(c['test_accuracy'], 4))} | {counts} "
                     f"| {c['params_added'].mean():,.0f} |")
    mean, low, high = t_interval(diff)
    wins = f"chunked better in {(diff > 0).sum()}, equal in {(diff == 0).sum()}, worse in " \
           f"{(diff < 0).sum()} of {n}"
    lines += [
        "", f"Paired difference (chunked − legacy, per seed): {mean:+.4f}, 95 % CI "
        f"[{low:+.4f}, {high:+.4f}] (t, {n - 1} df); {wins}.", "",
        f"**Verdict** (sequential test): {sequential_verdict(runs)}.", "",
        "## Speed", "",
        "Step time: the median over a run's training steps (forward, backward, both optimizer "
        "steps; epoch boundaries left out), then over runs.", "",
        "| path | step ms, mean ± sd | 95 % CI | wall s per run, mean |", "|---|---|---|---|",
    ]
    for path in ORDER:
        c = col[path]
        lines.append(f"| {path} | {' | '.join(_fmt(c['step_ms'], 3))} | {c['wall_s'].mean():.1f} |")
    mean, low, high = t_interval(step_diff)
    ratio = col["chunked"]["step_ms"].mean() / col["legacy"]["step_ms"].mean()
    lines += [
        "", f"Paired step-time difference (chunked − legacy): {mean:+.3f} ms, 95 % CI "
        f"[{low:+.3f}, {high:+.3f}]; chunked / legacy {ratio:.2f}×.", "",
        "## Machine", "",
        f"- {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} on the CPU with {torch.get_num_threads()} thread(s), Python "
        f"{platform.python_version()}",
        f"- load average (1, 5, 15 min) before {_loads(load[0])}, after {_loads(load[1])} "
        f"(other work on the machine slows both paths alike: they alternate); total wall time "
        f"{wall_s:.0f} s",
        f"- `python -m kasmina ab --runs {args.runs} --epochs {args.epochs}`", "",
        "## Files", "",
        "- `runs.csv`: one row per run",
        "- `accuracy.png`: test accuracy per seed per path",
        "- `step_time.png`: step time per run per path", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kasmina ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="random seeds (pairs of runs)")
    ap.add_argument("--epochs", type=int, default=DigitsParams.epochs)
    ap.add_argument("--out", default="runs/ab", help="folder for report.md, runs.csv, plots")
    args = ap.parse_args(argv)
    if args.runs < 2 or args.epochs < 1:
        ap.error("--runs must be >= 2 (an interval needs two pairs) and --epochs >= 1")
    torch.set_num_threads(1)  # as the demo: one thread per run, steadier step times
    data = load_digits_split()
    load_before = os.getloadavg()
    # The first run in a process pays for lazy initialisation (measured: 1.0 s of wall time
    # against 0.2 s for the next 20-epoch run): one untimed epoch first.
    run_one(DigitsParams(epochs=1), ORDER[0], data)
    start = time.perf_counter()
    runs = []
    for seed in range(args.runs):
        p = DigitsParams(epochs=args.epochs, seed=seed)
        for path in ORDER:
            r = run_one(p, path, data)
            runs.append(r)
            print(f"seed {seed:3d} {path:<8} test accuracy {r.test_accuracy:.4f}  step "
                  f"{r.step_ms:.3f} ms  fossilised {r.fossilized} culled {r.culled} rolled back "
                  f"{r.rolled_back}  {r.wall_s:.1f} s", flush=True)
    wall_s = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in runs)
    plot(runs, out)
    text = render(runs, args, p, wall_s, (load_before, os.getloadavg()))
    (out / "report.md").write_text(text)
    print(f"\n{text}\nwritten to {out}/")
    return 0
