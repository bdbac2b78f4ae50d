"""benchmarks/efficacy: the statistics on hand-made numbers, and one --quick run whose report
must hold every method and agree with its own CSV (no timing and no result asserted: the
harness measures, this checks that it measures what it says)."""

import csv
import dataclasses
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[3] / "benchmarks" / "efficacy"
_spec = importlib.util.spec_from_file_location("efficacy_paired", HARNESS / "paired.py")
paired_mod = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = paired_mod  # dataclasses look their module up there
_spec.loader.exec_module(paired_mod)
paired = paired_mod.paired


def test_paired_difference_and_interval_from_hand_made_numbers() -> None:
    # d = [1, 2, 0, 1, 2]: mean 1.2, sample sd sqrt(0.7), t(0.975, 4) = 2.776
    d = paired([1, 2, 3, 4, 5], [2, 4, 3, 5, 7], "max")
    half = 2.776 * math.sqrt(0.7) / math.sqrt(5)
    assert d.n == 5 and d.mean == pytest.approx(1.2)
    assert (d.lo, d.hi) == (pytest.approx(1.2 - half), pytest.approx(1.2 + half))
    assert (d.better, d.worse) == (4, 0) and d.significant  # the tie counts for neither


def test_a_loss_is_better_when_it_falls() -> None:
    d = paired([0.5, 0.6, 0.7], [0.4, 0.5, 0.8], "min")
    assert d.mean == pytest.approx(-1 / 30)
    assert (d.better, d.worse) == (2, 1) and not d.significant
    same = paired([0.5, 0.6, 0.7], [0.4, 0.5, 0.8], "max")
    assert (same.better, same.worse) == (1, 2) and same.mean == d.mean


def test_equal_runs_give_a_zero_width_interval() -> None:
    d = paired([0.9, 0.8], [0.9, 0.8], "max")
    assert (d.mean, d.lo, d.hi, d.better, d.worse) == (0.0, 0.0, 0.0, 0, 0)
    assert not d.significant


@pytest.mark.parametrize(("baseline", "method", "direction", "match"), [
    ([1.0, 2.0], [1.0], "max", "unpaired"),
    ([1.0], [2.0], "max", "at least 2 pairs"),
    ([1.0, 2.0], [1.0, 2.0], "up", "direction"),
    ([1.0, float("nan")], [1.0, 2.0], "min", "non-finite"),
])
def test_bad_input_is_refused(baseline, method, direction, match) -> None:
    with pytest.raises(ValueError, match=match):
        paired(baseline, method, direction)


def test_compute_to_target_is_the_first_point_at_the_target(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(HARNESS))
    import engine
    import report

    rec = engine.RunRecord("t", "m", 0, curve=[
        engine.EpochPoint(1, 10, 0.50, 1.0, 0.1), engine.EpochPoint(2, 20, 0.30, 2.0, 0.2),
        engine.EpochPoint(3, 30, 0.20, 3.0, 0.3)])
    assert report.reach(rec, 0.30, "min").steps == 20  # reaching counts, passing is not needed
    assert report.reach(rec, 0.10, "min") is None
    assert report.reach(rec, 0.40, "max").steps == 10
    assert report.reach(rec, 0.60, "max") is None


def test_help_needs_no_environment() -> None:
    out = subprocess.run([sys.executable, "-S", str(HARNESS / "run.py"), "--help"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "--quick" in out.stdout and "--seeds" in out.stdout


def test_a_subset_run_with_its_controls(tmp_path: Path) -> None:
    """--controls: each --subsets configuration with its static-final, insertion and
    insertion_all; refused without --ablate changes."""
    out = subprocess.run([sys.executable, str(HARNESS / "run.py"), "--controls"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--controls needs --ablate changes" in out.stderr
    subprocess.run([sys.executable, str(HARNESS / "run.py"), "--task", "digits", "--quick",
                    "--ablate", "changes", "--subsets", "shipped", "--controls", "--out",
                    str(tmp_path), "--date", "test"], check=True, timeout=240,
                   capture_output=True, text=True)
    with (tmp_path / "efficacy_digits_cpu_test_quick_ablate-subsets.csv").open() as fh:
        methods = {r["method"] for r in csv.DictReader(fh)}
    assert methods == {"host", "shipped", "static_final@shipped", "insertion@shipped",
                       "insertion_all@shipped"}


def test_one_seed_is_refused() -> None:
    out = subprocess.run([sys.executable, "-S", str(HARNESS / "run.py"), "--seeds", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "at least 2" in out.stderr


def test_quick_run_reports_every_method_and_agrees_with_its_csv(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(HARNESS / "run.py"), "--task", "digits", "--quick",
                    "--out", str(tmp_path), "--date", "test"], check=True, timeout=240,
                   capture_output=True, text=True)
    md = (tmp_path / "efficacy_digits_cpu_test_quick.md").read_text()
    with (tmp_path / "efficacy_digits_cpu_test_quick.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    methods = ["host", "seeds_default", "seeds_candidate", "static_final", "insertion",
               "insertion_all", "static_final@candidate", "insertion@candidate",
               "insertion_all@candidate", "plain_matched",
               "abl_random_placement", "abl_no_reconstruction", "abl_no_ramp",
               "abl_fixed_schedule"]
    for m in methods:
        assert sorted(int(r["seed"]) for r in rows if r["method"] == m) == [0, 1], m
        assert re.search(rf"^\| {re.escape(m)} \| ", md, re.M), m
    assert "| method | test accuracy mean ± sd | vs host |" in md
    # The vs-host column of a method is paired() over the CSV's final metrics.
    final = {(r["method"], int(r["seed"])): float(r["final"]) for r in rows}
    for m in ("abl_fixed_schedule", "seeds_default"):
        d = paired([final["host", s] for s in (0, 1)], [final[m, s] for s in (0, 1)], "max")
        cell = re.search(rf"^\| {re.escape(m)} \| [^|]+ \| ([^|]+) \|", md, re.M).group(1)
        assert cell.startswith(f"{d.mean:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}] ({d.better}/2"), cell
    assert (tmp_path / "efficacy_digits_cpu_test_quick.png").stat().st_size > 0


def test_change_sets_name_the_configurations_they_run(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(HARNESS))
    import plan

    changes = plan.candidate_changes()
    assert changes["seed_lr"] == 3e-3 and changes["germinations_per_plateau"] == 4
    assert plan.change_set("candidate") == plan.CANDIDATE
    assert plan.change_set("default") == plan.FORMER_DEFAULTS != plan.Growth()
    one = plan.change_set("default+seed_lr+min_delta")
    former = plan.FORMER_DEFAULTS
    assert (one.kasmina, one.controller) == (former.kasmina.replace(seed_lr=3e-3),
                                             dataclasses.replace(former.controller,
                                                                 min_delta=0.01))
    out = plan.change_set("candidate-isolate_host_in_blend")
    assert out.kasmina.isolate_host_in_blend and out.kasmina.seed_lr == 3e-3
    assert plan.change_set("candidate+min_delta_rel=0.01").min_delta_rel == 0.01
    assert plan.change_set("shipped+blueprint='residual_mlp'").blueprint == "residual_mlp"
    for placement in ("random", "saliency", "gradient"):  # the harness's field, not the config's
        growth = plan.change_set(f"shipped+placement={placement}")
        assert (growth.placement, growth.controller.placement) == (placement, "health")
    assert len(plan.change_sets()) == 2 * len(changes)
    for bad in ("default+nothing", "host+seed_lr", "default-min_delta_rel=0.01"):
        with pytest.raises(ValueError):
            plan.change_set(bad)


def test_subsets_need_the_changes_mode() -> None:
    out = subprocess.run([sys.executable, "-S", str(HARNESS / "run.py"), "--subsets",
                          "default+seed_lr"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--ablate changes" in out.stderr


def test_worst_setback_is_the_largest_fall_between_measured_epochs(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(HARNESS))
    import report
    from engine import EpochPoint, RunRecord

    def run(metrics: list[float]) -> RunRecord:
        return RunRecord("t", "m", 0, curve=[EpochPoint(i, i, m, 0.0, 0.0)
                                             for i, m in enumerate(metrics)])

    assert report.setback(run([0.5, 0.7, 0.6, 0.9]), "max") == pytest.approx(0.1)
    assert report.setback(run([1.0, 0.8, 0.95, 0.5]), "min") == pytest.approx(0.15)
    assert report.setback(run([0.5, 0.6, 0.7]), "max") == 0.0


def test_a_change_set_can_start_from_the_shipped_defaults_and_set_any_field(monkeypatch
                                                                            ) -> None:
    monkeypatch.syspath_prepend(str(HARNESS))
    import plan
    from kasmina import ControllerConfig, KasminaConfig

    got = plan.change_set("shipped+fine_tuning_epochs=1+min_delta=1e-3")
    assert got.kasmina == KasminaConfig(fine_tuning_epochs=1)
    assert got.controller == dataclasses.replace(ControllerConfig(), min_delta=1e-3)
    assert plan.change_set("shipped") == plan.Growth()
    with pytest.raises(ValueError, match="neither config"):
        plan.change_set("shipped+no_such_field=1")
    assert plan.describe_change_set("shipped+ramp_steps=1") == (
        "the shipped defaults with ramp_steps=1.")
