"""`make smoke` as a test: the fleet in containers on its compose network, signed and
authenticated, a job that grows seeds and an alert that fires (deploy/smoke.sh). Needs a running
Docker daemon (`dockerd --storage-driver=vfs --iptables=false --bridge=none`, deploy/README.md).
Measured on the 2-core EPYC: 184 s with cached images, about 8 min cold
(benchmarks/results/deploy_make_up_cpu_2026-12-01.txt); so it is `slow`: RUN_SLOW=1."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_make_smoke_passes_on_the_compose_network() -> None:
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no Docker daemon answers (deploy/README.md says how to start one)")
    result = subprocess.run(["make", "smoke"], cwd=ROOT, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "== smoke passed" in result.stdout
