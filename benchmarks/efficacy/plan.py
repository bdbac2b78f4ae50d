"""Which methods run on a task, in which order (controls need the grown runs they mirror), and
the configurations under test, written out once so the report quotes what ran."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import subprocess
import time
from pathlib import Path

import gromo_baseline
import report
import torch
from charlm import CHARLM
from engine import RunRecord
from kasmina import ControllerConfig, KasminaConfig
from methods import Growth, matched_scale, run_branched, run_host, run_seeded
from tasks import DIGITS, REGRESSION

# The candidate defaults: the configuration the demo recipe tuned for digits, applied unchanged
# to every task (benchmarks/NOTES.md "Efficacy").
CANDIDATE = Growth(
    KasminaConfig(ramp_steps=150, isolate_host_in_blend=False, seed_lr=3e-3),
    ControllerConfig(plateau_epochs=2, min_delta=0.01, germinations_per_plateau=4))


def ablations(base: Growth) -> dict[str, Growth]:
    """The lifecycle ablations of a seeded configuration, each through the library's knobs."""
    k, c = base.kasmina, base.controller
    return {
        # ControllerConfig has no placement knob: methods.RandomPlacement shuffles the sites.
        "abl_random_placement": dataclasses.replace(base, placement="random"),
        # No knob skips TRAINING: a gate that always passes leaves one epoch of reconstruction.
        "abl_no_reconstruction": dataclasses.replace(base, kasmina=k.replace(
            reconstruction_threshold=math.inf, min_training_steps=0)),
        "abl_no_ramp": dataclasses.replace(base, kasmina=k.replace(ramp_steps=1)),
        # No progress ever counts: a germination every plateau_epochs epochs.
        "abl_fixed_schedule": dataclasses.replace(base, controller=dataclasses.replace(
            c, min_delta=math.inf)),
    }


DESCRIPTIONS = {
    "host": "the host alone.",
    "seeds_default": "host + seeds, `KasminaConfig()` and `ControllerConfig()` as shipped "
                     "(mode min: the controller watches validation loss), `wrap` on the "
                     "task's seed sites (8 seeds per layer, wrap's default, on the MLP tasks; "
                     "1 per residual stream on charlm).",
    "seeds_candidate": "host + seeds with the candidate defaults, the fields that differ from "
                       "the shipped ones: " + ", ".join(
                           f"{k}={v}" for cfg, base in ((CANDIDATE.kasmina, KasminaConfig()),
                                                        (CANDIDATE.controller, ControllerConfig()))
                           for k, v in cfg.__dict__.items() if getattr(base, k) != v) + ".",
    "static_final": "the architecture `seeds_default` ended with (its seeds in GRAFTING.."
                    "FOSSILIZED at the end), trained from scratch, branches identity-"
                    "initialised; host AdamW, branches Adam at the seeds' lr.",
    "insertion": "the same branches as `static_final`, each switched in (identity-"
                 "initialised, alpha 1) at the epoch its seed germinated in `seeds_default`; "
                 "no reconstruction, ramp or gates.",
    "static_final@candidate": "as `static_final`, for `seeds_candidate`'s architecture.",
    "insertion@candidate": "as `insertion`, for `seeds_candidate`'s branches and epochs.",
    "plain_matched": "the host family with every hidden width scaled to the parameter count "
                     "of `seeds_candidate`'s grown model (nearest 1/8 step), from scratch.",
    "gromo_bottleneck": "GroMo (TINY) widening the layer before the output (digits' rank-4 "
                        "bottleneck, regression's hidden layer), parameter budget = "
                        "`seeds_candidate`'s added parameters, from epoch 10 every 5 epochs.",
    "gromo_seed_site": "GroMo restricted to the seeds' position (digits: widens the first "
                       "layer's 64 outputs), same budget and schedule.",
}
for _tag, _base in (("", "seeds_default"), ("@candidate", "seeds_candidate")):
    DESCRIPTIONS.update({
        f"abl_random_placement{_tag}": f"`{_base}` with germination sites drawn at random.",
        f"abl_no_reconstruction{_tag}": f"`{_base}` with reconstruction_threshold inf, "
                                        "min_training_steps 0 (the gate passes after one epoch).",
        f"abl_no_ramp{_tag}": f"`{_base}` with ramp_steps 1 (alpha 1 at the first grafting "
                              "step).",
        f"abl_fixed_schedule{_tag}": f"`{_base}` with min_delta inf: a germination every "
                                     "plateau_epochs epochs whatever the metric does."})


TASK_LINES = {
    "digits": "scikit-learn's digits, the demo's bottleneck host 64 -> 64 -> 4 -> 10 (linear, "
              "rank 4), AdamW lr 3e-3 weight decay 1.0 (benchmarks/efficacy/tasks.py)",
    "regression": "Friedman #1 (make_friedman1, 2,000 samples, noise 1, standardised "
                  "target), host 10 -> 32 -> ReLU -> 1, AdamW lr 3e-3 (tasks.py)",
    "charlm": "character-level LM on the standard library's sources, 2 attention-only blocks "
              "(d 64, 4 heads, context 64), one seed per block on the residual stream growing "
              "a feed-forward block of hidden 256, AdamW lr 3e-3 weight decay 0.01 (charlm.py)",
}


def task_of(name: str, quick: bool):
    task = {"digits": DIGITS, "regression": REGRESSION, "charlm": CHARLM}[name]
    if not quick:
        return task
    if name == "charlm":
        return dataclasses.replace(task, epochs=8, interval=6, eval_seqs=16,
                                   train_chars=50_000)
    return dataclasses.replace(task, epochs=12)


def _same_as(rec: RunRecord, method: str, note: str) -> RunRecord:
    """A control that would train exactly the host (nothing was grown): the host's run."""
    out = dataclasses.replace(rec, method=method, info={**rec.info, "note": note})
    return out


def runs_for_seed(task, data, seed: int, ablate: str = "default") -> list[RunRecord]:
    """Every method on one random seed. With ablate="candidate": the host, the candidate, its
    two controls and the ablations of the candidate instead of the defaults' (a second run)."""
    host = run_host(task, data, seed)
    recs = [host]
    cand = run_seeded(task, data, seed, "seeds_candidate", CANDIDATE)
    if ablate == "candidate":
        recs += [cand, *_controls(task, data, seed, host, cand, "@candidate")]
        return recs + [run_seeded(task, data, seed, f"{name}@candidate", growth)
                       for name, growth in ablations(CANDIDATE).items()]
    default = run_seeded(task, data, seed, "seeds_default", Growth())
    recs += [default, cand]
    for mirror, tag in ((default, ""), (cand, "@candidate")):
        recs += _controls(task, data, seed, host, mirror, tag)
    scale = matched_scale(task, cand.params, seed)
    recs.append(_same_as(host, "plain_matched", "(scale 1: the host)") if scale == 1.0 else
                run_host(task, data, seed, "plain_matched", scale))
    if hasattr(task, "widths") and gromo_baseline.available() is None:
        recs.append(gromo_baseline.run_gromo(task, data, seed, "gromo_bottleneck",
                                             cand.params_added, "bottleneck"))
        if len(task.widths) > 3:
            recs.append(gromo_baseline.run_gromo(task, data, seed, "gromo_seed_site",
                                                 cand.params_added, "seed"))
    for name, growth in ablations(Growth()).items():
        recs.append(run_seeded(task, data, seed, name, growth))
    return recs


def _controls(task, data, seed: int, host: RunRecord, mirror: RunRecord, tag: str
              ) -> list[RunRecord]:
    """static-final and insertion of `mirror`'s grown architecture."""
    recs = []
    branches = mirror.info["branches"]
    for method, from_start in ((f"static_final{tag}", True), (f"insertion{tag}", False)):
        if not branches:
            recs.append(_same_as(host, method, "(nothing grown on some seeds: on those the "
                                               "control is the host's run)"))
            continue
        recs.append(run_branched(task, data, seed, method, branches, mirror.info["seed_lr"],
                                 from_start))
    return recs


def provenance() -> list[str]:
    import numpy

    root = Path(__file__).resolve().parents[2]
    src = root / "services" / "kasmina-runtime" / "src" / "kasmina"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(src.rglob("*.py"))))
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", str(src)],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        dirty_n = sum(bool(line.strip()) for line in dirty)
    except (OSError, subprocess.SubprocessError):
        head, dirty_n = "unknown", -1
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    gromo = gromo_baseline.available() or "gromo " + _version("gromo")
    return [f"Machine: {cpu}, one thread (torch.set_num_threads(1)); Python "
            f"{platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
            f"{gromo}.",
            f"Library: git {head}, {dirty_n} uncommitted file(s) under kasmina/, sources "
            f"sha256 {digest.hexdigest()[:12]} (the working tree as it was when this ran)."]


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


def run_task(name: str, seeds: int, quick: bool, out: Path, date: str,
             ablate: str = "default") -> list[Path]:
    task = task_of(name, quick)
    data = task.load()
    records: list[RunRecord] = []
    start, cpu0 = time.perf_counter(), time.process_time()
    for seed in range(seeds):
        records += runs_for_seed(task, data, seed, ablate)
        print(f"{name}: seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    stem = (f"efficacy_{name}_cpu_{date}" + ("_quick" if quick else "")
            + ("_ablate-candidate" if ablate == "candidate" else ""))
    png = out / f"{stem}.png"
    plotted = report.plot(png, task, records)
    header = [f"Run: `python benchmarks/efficacy/run.py --task {name} --seeds {seeds}"
              f"{' --quick' if quick else ''}"
              f"{' --ablate candidate' if ablate == 'candidate' else ''}`, {date}, "
              f"process CPU time {cpu:.0f} s (wall {wall:.0f} s on a shared machine).",
              *provenance(),
              f"Task: {TASK_LINES[name]} "
              f"({task.epochs} epochs{'' if name != 'charlm' else f' of {task.interval} steps'};"
              f" seed sites {', '.join(task.seed_sites)}, {task.seeds_per_layer} seed(s) "
              f"each; blueprint {task.blueprint}).",
              f"Plot: `{png.name}`." if plotted else "Plot: none (matplotlib not installed)."]
    if gromo_baseline.available() is not None:
        header.append(f"GroMo: not run ({gromo_baseline.available()}).")
    elif not hasattr(task, "widths"):
        header.append("GroMo: not run on this task: its containers grow MLP/conv widths, not "
                      "a block on a transformer's residual stream.")
    md = out / f"{stem}.md"
    md.write_text(report.markdown(task, records, header, DESCRIPTIONS))
    csv_path = out / f"{stem}.csv"
    report.write_csv(csv_path, records, task.direction)
    return [md, csv_path, *([png] if plotted else [])]
