"""`python -m kasmina ab`: the paired A/B harness of the two execution paths writes its report,
runs and plots, and the pairs really are paired (same init and data order on both paths)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from kasmina import DualPathLayer, seed_layers
from kasmina.__main__ import main as kasmina_main
from kasmina.ab import build_dual_path
from kasmina.recipes import DigitsParams

PNG = b"\x89PNG\r\n\x1a\n"


def test_both_arms_start_from_the_same_model_on_their_own_path():
    p = DigitsParams(seed=3)
    legacy, chunked = build_dual_path(p, "legacy"), build_dual_path(p, "chunked")
    assert [type(m) for m in seed_layers(legacy)] == [DualPathLayer]
    assert [m.execution_path for m in seed_layers(legacy)] == ["legacy"]
    assert [m.execution_path for m in seed_layers(chunked)] == ["chunked"]
    a, b = legacy.state_dict(), chunked.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        if value.is_floating_point():  # telemetry buffers start as NaN (not measured yet)
            torch.testing.assert_close(value, b[key], rtol=0, atol=0, equal_nan=True,
                                       msg=key)
    x = torch.rand(5, 64)
    assert torch.equal(legacy(x), chunked(x))  # the same function until a seed grows


def test_help_needs_no_environment(capsys):
    with pytest.raises(SystemExit) as exit_:
        kasmina_main(["ab", "--help"])
    assert exit_.value.code == 0
    assert "--runs" in capsys.readouterr().out


def test_a_tiny_run_writes_the_report_the_runs_and_the_plots(tmp_path):
    out = tmp_path / "ab"
    done = subprocess.run([sys.executable, "-m", "kasmina", "ab", "--runs", "2", "--epochs", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    for path in ("legacy", "chunked"):
        assert sum(line.startswith(f"| {path} | ") for line in report.splitlines()) == 2, path
    assert any(line.startswith("**Verdict** (sequential test): ") for line in report.splitlines())
    assert "Paired difference (chunked − legacy, per seed): +0.0000" in report
    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["seed"]) for r in rows] == [
        ("legacy", "0"), ("chunked", "0"), ("legacy", "1"), ("chunked", "1")]  # interleaved
    # Two epochs end before the first plateau, so nothing germinates and each pair is the same
    # run: equal accuracy shows the same init and data order on both paths.
    assert {r["germinated"] for r in rows} == {"0"}
    assert rows[0]["test_accuracy"] == rows[1]["test_accuracy"]
    assert rows[2]["test_accuracy"] == rows[3]["test_accuracy"]
    assert all(float(r["step_ms"]) > 0 for r in rows)
    for png in ("accuracy.png", "step_time.png"):
        assert (out / png).read_bytes().startswith(PNG), png
