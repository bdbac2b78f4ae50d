from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_grow_mlp_example_runs_and_grows(capsys):
    example = runpy.run_path(str(EXAMPLES / "grow_mlp.py"))
    events = example["main"](epochs=14)
    assert any(e.to_stage.name == "TRAINING" for e in events)
    assert "validation accuracy" in capsys.readouterr().out
