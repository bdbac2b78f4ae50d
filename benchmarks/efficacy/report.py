"""The report of one task: a Markdown table (paired differences with 95 % intervals, parameters,
compute, compute-to-target), a CSV of every run, and a plot (matplotlib, when installed)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from engine import RunRecord
from paired import paired, sd


def reach(rec: RunRecord, target: float, direction: str):
    """The first measured point at which the run's metric is at least as good as `target`."""
    for point in rec.curve:
        if (point.metric >= target) if direction == "max" else (point.metric <= target):
            return point
    return None


def by_method(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.method, []).append(r)
    for runs in out.values():
        runs.sort(key=lambda r: r.seed)
    return out


def pick_target(methods: dict[str, list[RunRecord]], direction: str) -> str | None:
    """The static-final control with the better mean final metric: the best grown architecture
    trained from scratch is the target every method's compute is measured against (None: no
    control ran, as in --ablate changes)."""
    names = [m for m in methods if m.startswith("static_final")]
    sign = 1.0 if direction == "max" else -1.0
    return max(names, key=lambda m: sign * sum(r.final for r in methods[m]) / len(methods[m]),
               default=None)


def rows(records: Sequence[RunRecord], direction: str) -> tuple[list[dict], str]:
    methods = by_method(records)
    host, target_name = methods["host"], pick_target(methods, direction)
    target_runs = {r.seed: r for r in methods.get(target_name, [])}
    out = []
    for name, runs in methods.items():
        finals = [r.final for r in runs]
        row = {"method": name, "n": len(runs), "mean": sum(finals) / len(finals),
               "sd": sd(finals), "params": sum(r.params for r in runs) / len(runs),
               "params_added": sum(r.params_added for r in runs) / len(runs),
               "cpu_s": sum(r.cpu_s for r in runs) / len(runs),
               "gflops": sum(r.flops for r in runs) / len(runs) / 1e9,
               "vs_host": None if name == "host" else paired(
                   [r.final for r in host], finals, direction),
               "vs_target": None if name == target_name or not target_runs else paired(
                   [target_runs[r.seed].final for r in runs], finals, direction)}
        ratios, steps, reached = [], [], 0
        for r in runs if target_runs else ():
            goal = target_runs[r.seed]
            mine, theirs = (reach(r, goal.final, direction), reach(goal, goal.final, direction))
            if mine is not None:
                reached += 1
                steps.append(mine.steps)
                ratios.append(mine.flops / theirs.flops)
        row.update(reached=reached, steps_to_target=_median(steps),
                   flops_ratio_to_target=_median(ratios),
                   setback=sum(setback(r, direction) for r in runs) / len(runs))
        trans = [r.info.get("transitions", {}) for r in runs]
        row["lifecycle"] = ("" if "transitions" not in runs[0].info else
                            f"{sum(t.get('FOSSILIZED', 0) for t in trans)} fossilized, "
                            f"{sum(t.get('CULLED', 0) for t in trans)} culled, "
                            f"{sum(t.get('ROLLED_BACK', 0) for t in trans)} rolled back, "
                            f"{sum(t.get('GERMINATED', 0) for t in trans)} germinated"
                            + ("" if "slots" not in runs[0].info else
                               f" ({sum(r.info['slots_germinated'] for r in runs)} of "
                               f"{sum(r.info['slots'] for r in runs)} slots)"))
        row["note"] = runs[0].info.get("note", "")
        out.append(row)
    return out, target_name


def setback(rec: RunRecord, direction: str) -> float:
    """The run's largest step backwards: the worst fall of the measured metric from one point of
    its curve to the next (0: it never got worse). A stability measure: a module switched in
    abruptly shows as a setback at its epoch."""
    sign = 1.0 if direction == "max" else -1.0
    ms = [p.metric for p in rec.curve]
    falls = [sign * (a - b) for a, b in zip(ms[:-1], ms[1:], strict=True)]
    return max([0.0] + [f for f in falls if math.isfinite(f)])


def _median(values: list[float]) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _diff(d) -> str:
    if d is None:
        return "—"
    star = " *" if d.significant else ""
    return f"{d.mean:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}] ({d.better}/{d.n} better){star}"


def markdown(task, records: Sequence[RunRecord], header: list[str],
             descriptions: dict[str, str]) -> str:
    table, target = rows(records, task.direction)
    better = "higher" if task.direction == "max" else "lower"
    lines = [f"# Efficacy: {task.name}", "", *header, "",
             f"Final metric: {task.metric_name} ({better} is better). Paired differences are "
             f"method minus baseline over the same random seeds, mean and 95 % t interval; "
             f"`*` marks an interval that excludes 0." + ("" if target is None else
             f" Compute-to-target: the first measured "
             f"epoch at which a run reaches `{target}`'s final metric of the same random seed; "
             f"steps are the median over the runs that reach it, and the FLOPs ratio is the "
             f"median of (FLOPs to get there) / (FLOPs `{target}` needed to get there itself).")
             + " Worst setback: the largest fall of the measured metric from one measured epoch "
             "to the next, mean over the runs (stability: an abrupt change shows there).",
             ""]
    # No static-final control (--ablate changes): no target, and no columns about it.
    cols = [("method", lambda r: r["method"]),
            (f"{task.metric_name} mean ± sd", lambda r: f"{r['mean']:.4f} ± {r['sd']:.4f}"),
            ("vs host", lambda r: _diff(r["vs_host"]))]
    if target is not None:
        cols.append((f"vs {target}", lambda r: _diff(r["vs_target"])))
    cols += [("params", lambda r: f"{r['params']:.0f}"),
             ("added", lambda r: f"{r['params_added']:.0f}"),
             ("CPU s", lambda r: f"{r['cpu_s']:.1f}"), ("GFLOPs", lambda r: f"{r['gflops']:.2f}")]
    if target is not None:
        cols += [("reached target", lambda r: f"{r['reached']}/{r['n']}"),
                 ("steps to target", lambda r: _fmt(r["steps_to_target"], ".0f")),
                 ("FLOPs ratio", lambda r: _fmt(r["flops_ratio_to_target"], ".2f"))]
    cols += [("worst setback", lambda r: f"{r['setback']:.4f}"),
             ("lifecycle", lambda r: r["lifecycle"])]
    lines += ["| " + " | ".join(c for c, _ in cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in table]
    lines += ["", "Methods:", ""]
    for r in table:
        note = f" {r['note']}" if r["note"] else ""
        lines.append(f"- `{r['method']}`: {descriptions.get(r['method'], '')}{note}")
    return "\n".join(lines) + "\n"


def _fmt(x: float, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_csv(path: Path, records: Sequence[RunRecord], direction: str) -> None:
    methods = by_method(records)
    target = {r.seed: r for r in methods.get(pick_target(methods, direction), [])}
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "method", "seed", "final", "params", "params_added", "cpu_s",
                    "flops", "steps", "steps_to_target", "flops_to_target", "fossilized",
                    "culled", "germinated", "worst_setback", "slots_germinated", "slots",
                    "rolled_back"])
        for r in records:
            p = reach(r, target[r.seed].final, direction) if target else None
            t = r.info.get("transitions", {})
            w.writerow([r.task, r.method, r.seed, f"{r.final:.6f}", r.params, r.params_added,
                        f"{r.cpu_s:.3f}", f"{r.flops:.4e}", r.curve[-1].steps,
                        "" if p is None else p.steps, "" if p is None else f"{p.flops:.4e}",
                        t.get("FOSSILIZED", ""), t.get("CULLED", ""), t.get("GERMINATED", ""),
                        f"{setback(r, direction):.6f}", r.info.get("slots_germinated", ""),
                        r.info.get("slots", ""), t.get("ROLLED_BACK", "")])


def plot(path: Path, task, records: Sequence[RunRecord]) -> bool:
    """Metric against cumulative FLOPs (mean over seeds) and the paired difference to the host
    per method. False when matplotlib is not installed (no plot is written)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table, _ = rows(records, task.direction)
    methods = by_method(records)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name, runs in methods.items():
        n = min(len(r.curve) for r in runs)
        xs = [sum(r.curve[i].flops for r in runs) / len(runs) / 1e9 for i in range(n)]
        ys = [sum(r.curve[i].metric for r in runs) / len(runs) for i in range(n)]
        style = "-" if name.startswith(("host", "seeds", "static")) else "--"
        left.plot(xs, ys, style, label=name, linewidth=1.2)
    left.set_xlabel("cumulative training + validation GFLOPs (mean over seeds)")
    left.set_ylabel(task.metric_name)
    left.set_title(f"{task.name}: metric against compute")
    left.legend(fontsize=7)
    if task.direction == "min":
        left.set_ylim(top=_upper(methods))
    diffs = [r for r in table if r["vs_host"] is not None]
    ys = range(len(diffs))
    right.errorbar([r["vs_host"].mean for r in diffs], ys,
                   xerr=[[r["vs_host"].mean - r["vs_host"].lo for r in diffs],
                         [r["vs_host"].hi - r["vs_host"].mean for r in diffs]],
                   fmt="o", capsize=3)
    right.axvline(0.0, color="grey", linewidth=0.8)
    right.set_yticks(list(ys), [r["method"] for r in diffs], fontsize=8)
    right.set_xlabel(f"{task.metric_name}: method − host (95 % interval), "
                     f"{'right' if task.direction == 'max' else 'left'} is better")
    right.set_title("paired difference to the host alone")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _upper(methods: dict[str, list[RunRecord]]) -> float:
    """A y limit that shows the curves' second half (a loss's first epochs dwarf the rest)."""
    values = [p.metric for runs in methods.values() for r in runs
              for p in r.curve[len(r.curve) // 4:]]
    return max(values) * 1.05
