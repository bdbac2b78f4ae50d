"""Tamiyo's cost per health report, for the capacity note in NOTES.md: decode a serialized
`LayerHealthReport` (protobuf), record it in the job's view and run the policy at the epoch's
end, for 8 layers of 16 and of 1,024 seeds; no bus (the bus's own cost is `bench_bus.py`'s).

    .venv/bin/python benchmarks/probe_tamiyo.py
"""

from __future__ import annotations

import argparse
import math
import time

from oona.contracts import EpochEvent, EpochEventKind, LayerHealthReport
from oona.contracts import SeedStage as Stage
from tamiyo.blueprints import BlueprintChoice
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.policy import HeuristicPolicy, PolicyConfig
from tamiyo.view import JobView


class Fixed:
    def choose(self, job_id: str, layer_id: str, chunk_size: int) -> BlueprintChoice:
        return BlueprintChoice("residual_mlp", "fixed_ramp", "fixed")


def report(layer: str, epoch: int, n: int) -> bytes:
    return LayerHealthReport(
        job_id="job", layer_id=layer, epoch=epoch, step=epoch * 100, num_seeds=n,
        features=4 * n, stage=[Stage.SEED_STAGE_DORMANT] * n, blueprint_id=[-1] * n,
        epochs_in_stage=[epoch] * n, strategy_id=[-1] * n, alpha=[0.0] * n,
        chunk_variance=[1.0 + i / n for i in range(n)], dead_ratio=[0.0] * n,
        mean_abs_correlation=[0.1] * n, reconstruction_ratio=[math.nan] * n,
        grad_norm=[0.0] * n, drift=[0.0] * n, contribution=[math.nan] * n,
        ready_for=[Stage.SEED_STAGE_UNSPECIFIED] * n).SerializeToString()


def main() -> None:
    for seeds in (16, 1024):
        layers, epochs = 8, 200
        raw = {(lay, e): report(f"l{lay}", e, seeds)
               for lay in range(layers) for e in range(epochs)}
        controller = Controller(HeuristicPolicy(PolicyConfig(plateau_epochs=1), Fixed()),
                                DeliveryConfig(ack_timeout_s=10.0, max_attempts=3))
        view = JobView("job")
        start = time.perf_counter()
        for e in range(epochs):
            for lay in range(layers):
                view.record_report(LayerHealthReport.FromString(raw[(lay, e)]))
            view.record_epoch_end(EpochEvent(
                job_id="job", kind=EpochEventKind.EPOCH_EVENT_KIND_EPOCH_ENDED, epoch=e,
                step=e * 100, val_metric=0.5, higher_is_better=True), now=float(e))
            controller.decide(view, now=float(e))
        per = (time.perf_counter() - start) / (epochs * layers)
        print(f"{seeds:5d} seeds: {len(raw[(0, 0)]):6d} bytes a report, "
              f"{per * 1e6:8.1f} us a report (decode, record, decide)")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    main()
