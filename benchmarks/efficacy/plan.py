"""Which methods run on a task, in which order (controls need the grown runs they mirror), and
the configurations under test, written out once so the report quotes what ran."""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import hashlib
import math
import multiprocessing
import os
import platform
import resource
import subprocess
import time
from collections.abc import Sequence
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


# The library's defaults before ADR 0007 (docs/adr), from which `--ablate changes` starts, so
# its published tables (benchmarks/NOTES.md, "Which of the candidate's six changes pay")
# reproduce: "default" in a change set's name means these. `seeds_default` runs the shipped ones.
FORMER_DEFAULTS = Growth(
    KasminaConfig(seed_lr=1e-3),
    ControllerConfig(plateau_epochs=3, min_delta=1e-3, germinations_per_plateau=1))


def candidate_changes() -> dict[str, object]:
    """The fields CANDIDATE sets to other values than FORMER_DEFAULTS (the field names of
    KasminaConfig and ControllerConfig do not overlap)."""
    return {k: v for cfg, base in ((CANDIDATE.kasmina, FORMER_DEFAULTS.kasmina),
                                   (CANDIDATE.controller, FORMER_DEFAULTS.controller))
            for k, v in cfg.__dict__.items() if getattr(base, k) != v}


# --ablate changes: knobs the library lacks, emulated by the harness (methods.Growth), each
# added to a configuration like a change: a zero-output blueprint init, a plateau threshold
# relative to the best validation loss instead of min_delta, random placement (the
# lifecycle ablation's, on any configuration) and placement by the task loss's gradient at
# each seed's chunk (ControllerConfig.placement="gradient": mean g^2; or |g * out|,
# methods.SaliencyPlacement).
EXTRAS = {"init=zero_output": {"init": "zero_output"},
          "placement=random": {"placement": "random"},
          "placement=gradient": {"placement": "gradient"},
          "placement=saliency": {"placement": "saliency"},
          "min_delta_rel=0.01": {"min_delta_rel": 0.01},
          "min_delta_rel=0.03": {"min_delta_rel": 0.03}}


# Growth's own fields a term "f=v" may set to a literal, like a config field's: the seeds per
# seed layer (shipped+seeds_per_layer=32: a budget of a few of many chunks) and the blueprint
# (shipped+blueprint='residual_mlp': charlm's seeds grow the catalog's instead of its own).
GROWTH_VALUES = {"seeds_per_layer", "blueprint"}


def with_fields(growth: Growth, fields: dict[str, object]) -> Growth:
    # Growth's own first: its placement picks the controller (ControllerConfig.placement
    # knows only the library's "health" and "gradient"; "random", "saliency" are the harness's)
    g = {f: v for f, v in fields.items() if f in Growth.__dataclass_fields__}
    k = {f: v for f, v in fields.items() if f in KasminaConfig.__dataclass_fields__ and f not in g}
    c = {f: v for f, v in fields.items()
         if f in ControllerConfig.__dataclass_fields__ and f not in g}
    return dataclasses.replace(growth, kasmina=growth.kasmina.replace(**k),
                               controller=dataclasses.replace(growth.controller, **c), **g)


def change_set(name: str) -> Growth:
    """A configuration named by its changes: "default+f+g" is FORMER_DEFAULTS with the
    candidate's values of fields f and g (or an EXTRAS entry), "candidate-f" the candidate with
    the former default value of f; "default" and "candidate" alone are the two themselves;
    "shipped" is the library's defaults as they are (Growth()); a term "f=v" sets a field of
    KasminaConfig or ControllerConfig, or one of GROWTH_VALUES, to the literal v (e.g.
    shipped+fine_tuning_epochs=1, shipped+seeds_per_layer=32)."""
    changes, shipped = candidate_changes(), FORMER_DEFAULTS
    base, *terms = _terms(name)
    fields = dict(changes) if base == "candidate" else {}
    if base not in ("default", "candidate", "shipped"):
        raise ValueError(f"{name!r}: starts with 'default', 'candidate' or 'shipped'")
    if base == "shipped":
        shipped = Growth()
    for term in terms:
        f = term.lstrip("-")
        if "=" in term and not term.startswith("-") and term not in EXTRAS:
            f, value = term.split("=", 1)
            if f not in (KasminaConfig.__dataclass_fields__.keys()
                         | ControllerConfig.__dataclass_fields__.keys() | GROWTH_VALUES):
                raise ValueError(f"{name!r}: {f!r} is a field of neither config nor of "
                                 f"methods.Growth's {sorted(GROWTH_VALUES)}")
            fields[f] = ast.literal_eval(value)
        elif term.startswith("-") and f in changes:
            fields[f] = getattr(shipped.kasmina if f in KasminaConfig.__dataclass_fields__
                                else shipped.controller, f)
        elif not term.startswith("-") and f in changes:
            fields[f] = changes[f]
        elif not term.startswith("-") and f in EXTRAS:
            fields.update(EXTRAS[f])
        else:
            raise ValueError(f"{name!r}: {term!r} is not +/- one of {sorted(changes)} or "
                             f"+ one of {sorted(EXTRAS)}")
    return with_fields(shipped, fields)


def _terms(name: str) -> list[str]:
    """"candidate-f+g+h=1e-3" -> ["candidate", "-f", "g", "h=1e-3"] (a value runs to the next
    "+", so it may hold a "-")."""
    out = []
    for part in name.split("+"):
        if "=" in part:
            out.append(part)
            continue
        first, *minus = part.split("-")
        out += [first, *(f"-{m}" for m in minus)]
    return out


def change_sets() -> list[str]:
    """--ablate changes' configurations: each change alone on the defaults and each left out of
    the candidate (the two themselves are in the main report, bit-identical: --subsets adds
    them, and EXTRAS or any other set)."""
    changes = list(candidate_changes())
    return [f"default+{f}" for f in changes] + [f"candidate-{f}" for f in changes]


def describe_change_set(name: str) -> str:
    if name == "candidate":
        return DESCRIPTIONS["seeds_candidate"]
    if name == "default":
        return "the library's defaults before ADR 0007 (plan.FORMER_DEFAULTS)."
    if name == "shipped":
        return "the library's defaults as shipped (the runs of `seeds_default`)."
    base = {"default": "the former defaults", "shipped": "the shipped defaults"}.get(
        _terms(name)[0], "`seeds_candidate`")
    return (f"{base} with "
            + ", ".join(("the former default " + t[1:]) if t.startswith("-") else t
                        for t in _terms(name)[1:]) + ".")


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
                           f"{k}={v}" for k, v in candidate_changes().items()) + ".",
    "static_final": "the architecture `seeds_default` ended with (its seeds in GRAFTING.."
                    "FOSSILIZED at the end), trained from scratch, branches identity-"
                    "initialised; host AdamW, branches Adam at the seeds' lr.",
    "insertion": "the same branches as `static_final`, each switched in (identity-"
                 "initialised, alpha 1) at the epoch its seed germinated in `seeds_default`; "
                 "no reconstruction, ramp or gates.",
    "insertion_all": "every chunk `seeds_default` germinated, culled ones too, each switched in "
                     "(identity-initialised, alpha 1) at its first germination epoch and kept: "
                     "insertion without the lifecycle's selection.",
    "insertion_all@candidate": "as `insertion_all`, for `seeds_candidate`'s germinations.",
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


def method_of(change_set: str) -> str:
    return f"seeds_{change_set}" if change_set in ("default", "candidate") else change_set


def run_one(task, data, seed: int, name: str) -> RunRecord:
    """The host, or a configuration named as change_set names it."""
    return (run_host(task, data, seed) if name == "host" else
            run_seeded(task, data, seed, method_of(name), change_set(name)))


_WORKER: dict = {}


def _start_worker(name: str, quick: bool) -> None:
    torch.set_num_threads(1)
    task = task_of(name, quick)
    _WORKER.update(task=task, data=task.load())


def _job(args: tuple) -> list[RunRecord]:
    seed, ablate, sets, controls = args
    task, data = _WORKER["task"], _WORKER["data"]
    if ablate == "changes":  # the host is a configuration of its own here
        recs = []
        for s in sets:
            recs.append(run_one(task, data, seed, s))
            if controls and s != "host":  # --controls: static-final, insertion, insertion_all
                recs += _controls(task, data, seed, None, recs[-1], f"@{s}")
        return recs
    return runs_for_seed(task, data, seed, ablate, sets)


def run_all(name: str, task, data, seeds: int, quick: bool, ablate: str, sets: list[str],
            jobs: int, controls: bool = False) -> list[RunRecord]:
    """Every seed's runs, in `jobs` one-thread processes (forked) when jobs > 1: one job per
    (seed, configuration) with --ablate changes, else one per seed (its controls need its grown
    runs). The records come back in the order one process would make them."""
    work = ([(seed, ablate, [s], controls) for seed in range(seeds) for s in ("host", *sets)]
            if ablate == "changes" else [(seed, ablate, sets, False) for seed in range(seeds)])
    if jobs <= 1:
        _WORKER.update(task=task, data=data)
        pool, results = None, map(_job, work)
    else:
        pool = concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
            initargs=(name, quick))
        results = pool.map(_job, work)
    records: list[RunRecord] = []
    start = time.perf_counter()
    for (seed, *_), recs in zip(work, results, strict=True):
        records += recs
        print(f"{name}: seed {seed}, {recs[-1].method} done "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    if pool is not None:
        pool.shutdown()
    return records


def runs_for_seed(task, data, seed: int, ablate: str = "default",
                  sets: Sequence[str] = ()) -> list[RunRecord]:
    """Every method on one random seed. With ablate="candidate": the host, the candidate, its
    two controls and the ablations of the candidate instead of the defaults' (a second run).
    With ablate="changes": the host and the configurations named in `sets` (change_set)."""
    if ablate == "changes":
        return [run_one(task, data, seed, name) for name in ("host", *sets)]
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


def _controls(task, data, seed: int, host: RunRecord | None, mirror: RunRecord, tag: str
              ) -> list[RunRecord]:
    """static-final and insertion of `mirror`'s grown architecture, and insertion of every
    chunk it germinated (insertion_all: no selection by the lifecycle's gates)."""
    recs = []
    for method, from_start, key in ((f"static_final{tag}", True, "branches"),
                                     (f"insertion{tag}", False, "branches"),
                                     (f"insertion_all{tag}", False, "germinated_branches")):
        branches = mirror.info[key]
        if not branches:
            host = host or run_host(task, data, seed)
            recs.append(_same_as(host, method, "(nothing grown on some seeds: on those the "
                                               "control is the host's run)"))
            continue
        recs.append(run_branched(task, data, seed, method, branches, mirror.info["seed_lr"],
                                 from_start))
    return recs


def provenance() -> list[str]:
    import kasmina
    import numpy

    root = Path(__file__).resolve().parents[2]
    src = root / "services" / "kasmina-runtime" / "src" / "kasmina"
    imported = Path(kasmina.__file__).resolve().parent  # another copy under PYTHONPATH, say
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(imported.rglob("*.py"))))
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
            f"sha256 {digest.hexdigest()[:12]} (the working tree as it was when this ran)."
            if imported == src.resolve() else
            f"Library: sources sha256 {digest.hexdigest()[:12]}, imported from {imported} "
            f"(not this checkout's, whose git state says nothing about them)."]


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_task(name: str, seeds: int, quick: bool, out: Path, date: str,
             ablate: str = "default", sets: Sequence[str] | None = None, jobs: int = 1,
             tag: str = "", controls: bool = False) -> list[Path]:
    """`sets`: ablate="changes"' configurations (None: change_sets(); a list given names the
    files ..._ablate-subsets); `controls`: each of them with its static-final, insertion and
    insertion_all (methods `static_final@<set>` ...)."""
    task = task_of(name, quick)
    data = task.load()
    chosen = ([] if ablate != "changes" else list(sets) if sets is not None else
              change_sets())
    for s in chosen:
        change_set(s)  # a bad name fails before anything runs
    descriptions = {**DESCRIPTIONS, **{method_of(s): describe_change_set(s) for s in chosen}}
    for s in chosen if controls else ():
        descriptions.update({f"{c}@{s}": f"as `{c}`, for `{method_of(s)}`."
                             for c in ("static_final", "insertion", "insertion_all")})
    start, cpu0 = time.perf_counter(), time.process_time() + _children_cpu()
    records = run_all(name, task, data, seeds, quick, ablate, chosen, jobs, controls)
    wall = time.perf_counter() - start
    cpu = time.process_time() + _children_cpu() - cpu0
    mode = ("" if ablate == "default" else
            "subsets" if ablate == "changes" and sets is not None else ablate)
    stem = (f"efficacy_{name}_cpu_{date}" + ("_quick" if quick else "")
            + (f"_ablate-{mode}" if mode else "") + (f"_{tag}" if tag else ""))
    png = out / f"{stem}.png"
    plotted = report.plot(png, task, records)
    header = [f"Run: `python benchmarks/efficacy/run.py --task {name} --seeds {seeds}"
              f"{' --quick' if quick else ''}"
              f"{'' if ablate == 'default' else f' --ablate {ablate}'}"
              f"{'' if sets is None else ' --subsets ' + ','.join(sets)}"
              f"{' --controls' if controls else ''}"
              f"{'' if jobs == 1 else f' --jobs {jobs}'}{f' --tag {tag}' if tag else ''}`, "
              f"{date}, "
              f"process CPU time {cpu:.0f} s (wall {wall:.0f} s"
              f"{' on a shared machine' if jobs == 1 else f' in {jobs} processes'}).",
              *provenance(),
              f"Task: {TASK_LINES[name]} "
              f"({task.epochs} epochs{'' if name != 'charlm' else f' of {task.interval} steps'};"
              f" seed sites {', '.join(task.seed_sites)}, {task.seeds_per_layer} seed(s) "
              f"each; blueprint {task.blueprint} unless a method's blueprint= term says"
              " another).",
              f"Plot: `{png.name}`." if plotted else "Plot: none (matplotlib not installed)."]
    if name == "charlm" and os.environ.get("EFFICACY_STDLIB"):
        header.append(f"Text: the stdlib files in EFFICACY_STDLIB={os.environ['EFFICACY_STDLIB']}"
                      f", not this interpreter's.")
    if gromo_baseline.available() is not None:
        header.append(f"GroMo: not run ({gromo_baseline.available()}).")
    elif not hasattr(task, "widths"):
        header.append("GroMo: not run on this task: its containers grow MLP/conv widths, not "
                      "a block on a transformer's residual stream.")
    md = out / f"{stem}.md"
    md.write_text(report.markdown(task, records, header, descriptions))
    csv_path = out / f"{stem}.csv"
    report.write_csv(csv_path, records, task.direction)
    return [md, csv_path, *([png] if plotted else [])]
