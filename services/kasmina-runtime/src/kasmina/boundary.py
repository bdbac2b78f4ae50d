"""A seed layer's epoch boundary (DESIGN §3.2, §3.4, §8): statistics reduced across ranks and
read back in one transfer, the table's boundary moves, the gates, and the health report."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import distributed
from .gates import evaluate_gates
from .seed_table import BLUEPRINT_ID, EPOCHS_IN_STAGE, STAGE, STRATEGY
from .telemetry import LayerHealthReport

if TYPE_CHECKING:
    from .layer import KasminaLayer


@torch.no_grad()
def end_epoch(layer: KasminaLayer, val_metric: float | None) -> LayerHealthReport:
    table, num, lanes = layer.table, layer.num_seeds, layer.table.num_lanes
    if layer._live_steps and not layer._train_mode_steps:
        warnings.warn(f"seed layer {layer.layer_id!r}: all {layer._live_steps} steps of this "
                      "epoch ran in eval mode, so its seeds did not train (call "
                      "model.train() after validating)", RuntimeWarning, stacklevel=3)
    layer._live_steps = layer._train_mode_steps = 0
    layer.telemetry.reduce_across_ranks()
    distributed.all_reduce_mean_([layer.lane_recon])
    flags = layer.lane_nonfinite.to(torch.int32)
    distributed.all_reduce_([flags], op="max")
    tel = layer.telemetry.summarize()
    cols = torch.cat([tel["chunk_variance"], tel["dead_ratio"], tel["mean_abs_correlation"],
                      tel["output_grad_sq"], layer.alpha.double(), layer.lane_recon.double(),
                      layer.lane_grad_norm.double(), layer.lane_drift.double(),
                      layer.lane_steps.double(), flags.double()]).cpu().numpy()
    layer.telemetry.reset()
    layer.lane_nonfinite.zero_()
    var, dead, corr, grad_sq, alpha = cols[:5 * num].reshape(5, num)
    per_lane = cols[5 * num:].reshape(5, lanes)
    held = table.slot >= 0
    recon, gnorm, drift, steps, nonfinite = np.full((5, num), np.nan)
    for row, values in zip((recon, gnorm, drift, steps, nonfinite), per_lane, strict=True):
        row[held] = values[table.slot[held]]
    nonfinite = np.nan_to_num(nonfinite) > 0
    contribution, gain = table.end_epoch(nonfinite, val_metric, layer.config.sign)
    table.readiness = table.readiness_from(evaluate_gates(
        table.state[:, STAGE], table.state[:, EPOCHS_IN_STAGE], np.nan_to_num(steps),
        recon, alpha, np.nan_to_num(drift), np.nan_to_num(gnorm), contribution, gain,
        layer.config))
    layer._commit()
    return _report(layer, val_metric, var, dead, corr, alpha, recon, gnorm, drift, contribution,
                   grad_sq)


@torch.no_grad()
def snapshot(layer: KasminaLayer, val_metric: float | None) -> LayerHealthReport:
    """The report of a layer as it stands, moving nothing: what a `DualPathLayer` publishes
    for the path it switched to at a boundary (no telemetry measured on it this epoch: NaN)."""
    num, lanes, table = layer.num_seeds, layer.table.num_lanes, layer.table
    cols = torch.cat([layer.alpha.double(), layer.lane_recon.double(),
                      layer.lane_grad_norm.double(), layer.lane_drift.double()]).cpu().numpy()
    alpha, per_lane = cols[:num], cols[num:].reshape(3, lanes)
    held = table.slot >= 0
    recon, gnorm, drift = np.full((3, num), np.nan)
    for row, values in zip((recon, gnorm, drift), per_lane, strict=True):
        row[held] = values[table.slot[held]]
    unmeasured = np.full(num, np.nan)
    return _report(layer, val_metric, unmeasured, unmeasured, unmeasured, alpha, recon, gnorm,
                   drift, unmeasured, unmeasured)


def _report(layer: KasminaLayer, val_metric: float | None, var: np.ndarray, dead: np.ndarray,
            corr: np.ndarray, alpha: np.ndarray, recon: np.ndarray, gnorm: np.ndarray,
            drift: np.ndarray, contribution: np.ndarray, grad_sq: np.ndarray
            ) -> LayerHealthReport:
    table = layer.table
    ready = np.full(layer.num_seeds, -1, dtype=np.int32)
    for seed_id, target in table.readiness.items():
        ready[seed_id] = target
    m = table.state
    return LayerHealthReport(
        layer_id=layer.layer_id, epoch=table.epoch, step=table.step, val_metric=val_metric,
        stage=m[:, STAGE].copy(), blueprint_id=m[:, BLUEPRINT_ID].copy(),
        epochs_in_stage=m[:, EPOCHS_IN_STAGE].copy(), strategy_id=m[:, STRATEGY].copy(),
        alpha=alpha.astype(np.float32), chunk_variance=var.astype(np.float32),
        dead_ratio=dead.astype(np.float32), mean_abs_correlation=corr.astype(np.float32),
        reconstruction_ratio=recon.astype(np.float32),
        grad_norm=np.nan_to_num(gnorm).astype(np.float32),
        drift=np.nan_to_num(drift).astype(np.float32),
        contribution=contribution.astype(np.float32), output_grad_sq=grad_sq.astype(np.float32),
        ready_for=ready,
        chunks=list(layer.chunks))
