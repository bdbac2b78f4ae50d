"""benchmarks/bench_regress.py's comparison, fed made-up ratios: no timing here (speed is the
benchmark's to measure, never a unit test's)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_regress.py"
_spec = importlib.util.spec_from_file_location("bench_regress", SCRIPT)
bench_regress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_regress)
compare = bench_regress.compare

BASE = {"256x256 dormant10": 1.0, "1024x128 graft10": 2.0}


def test_at_the_limit_passes_and_just_past_it_regresses() -> None:
    at = {"256x256 dormant10": 1.25, "1024x128 graft10": 2.5}  # exactly base * 1.25
    assert compare(BASE, at, 0.25) == []
    past = {"256x256 dormant10": 1.2501, "1024x128 graft10": 2.5}
    (line,) = compare(BASE, past, 0.25)
    assert line.startswith("REGRESSION 256x256 dormant10:") and "1.250" in line


def test_one_line_per_regressed_row_faster_rows_pass() -> None:
    got = compare(BASE, {"256x256 dormant10": 1.6, "1024x128 graft10": 3.1}, 0.25)
    assert [x.split(":")[0] for x in got] == [
        "REGRESSION 1024x128 graft10", "REGRESSION 256x256 dormant10"]
    assert all("\n" not in x for x in got)
    assert compare(BASE, {"256x256 dormant10": 0.5, "1024x128 graft10": 1.0}, 0.0) == []


def test_a_baseline_row_not_measured_is_flagged_a_new_row_is_not() -> None:
    got = compare(BASE, {"256x256 dormant10": 1.0, "512x64 training": 9.0}, 0.25)
    assert got == ["REGRESSION 1024x128 graft10: in the baseline (2.000) but not measured"]


def test_negative_tolerance_is_refused() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        compare(BASE, BASE, -0.1)


def test_help_needs_no_environment() -> None:
    # -S: no site-packages, so no torch and no kasmina; --help must still answer.
    out = subprocess.run([sys.executable, "-S", str(SCRIPT), "--help"], capture_output=True,
                         text=True, timeout=60, check=True)
    assert "--record" in out.stdout
