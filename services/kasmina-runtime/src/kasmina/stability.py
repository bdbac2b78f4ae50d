"""The stability guard (the plan's phase 5): growth pauses itself in a job while its training
looks unstable, and resumes once the job has been stable for `resume_epochs` epochs.

Three signals, each a pure function of numbers a controller already has at an epoch boundary:
- `metric_spike`: the epoch's validation metric is worse than the median of the epochs before
  it by more than `spike_mads` median absolute deviations (worse: lower for a metric where
  higher is better, an accuracy; higher for one minimised, a loss);
- `rollbacks`: `rollback_limit` or more seeds rolled back within `rollback_window` epochs;
- `drift`: a seed blended into its layer's output (GRAFTING..FINE_TUNING) has weight drift
  (DESIGN §3.3: |w - w_ema| / |w_ema|) above `drift_limit`.
Paused means no new germination; seeds already growing keep their lifecycle (gates, culls and
rollbacks go on). Growth resumes at the decision of the `resume_epochs`-th epoch after the
newest unstable one.

This file exists twice, byte for byte: tamiyo/stability.py and kasmina/stability.py. Services
never import each other (DESIGN §2), Kasmina's library needs only torch and numpy (oona is its
fleet extra) and Tamiyo stays torch-free, so no module is importable by both; Tamiyo's
tests/test_stability.py runs every case on both copies and fails when they differ. Standard
library only, so that both can hold it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SIGNALS = ("metric_spike", "rollbacks", "drift")


@dataclass(frozen=True)
class StabilityConfig:
    # A metric is a spike when worse than the median of the baseline by more than spike_mads
    # MADs, the spread counting as at least min_spread of the median (a baseline of equal
    # values, MAD 0, would otherwise make any worsening a spike). The baseline: the metrics of
    # up to baseline_epochs epochs before the one judged, judged once there are
    # min_baseline_epochs. Measured on the digits recipe's validation loss (seeds 0-4, host
    # alone and seeded, 800 epochs, no divergence): these call 2 epochs spikes and catch 29 of
    # 30 planted doublings of the loss; min_spread 0.01 called 12, and a 16-epoch baseline,
    # which still holds the steep early descent at epoch 20, caught 27.
    spike_mads: float = 5.0
    baseline_epochs: int = 8
    min_baseline_epochs: int = 4
    min_spread: float = 0.05
    rollback_limit: int = 2
    rollback_window: int = 5
    # Between the drift at which drift_controlled holds alpha (0.12) and the one at which the
    # runtime rolls the seed back (rollback_drift_limit, 1.0): growth waits while a blended
    # seed is on its way there. In the digits recipe blended seeds' drift stayed <= 0.111.
    drift_limit: float = 0.5
    resume_epochs: int = 3

    def __post_init__(self) -> None:
        if not self.spike_mads > 0 or self.min_spread < 0 or not self.drift_limit >= 0:
            raise ValueError("need spike_mads > 0, min_spread >= 0 and drift_limit >= 0")
        if not 1 <= self.min_baseline_epochs <= self.baseline_epochs:
            raise ValueError("need 1 <= min_baseline_epochs <= baseline_epochs")
        if self.rollback_limit < 1 or self.rollback_window < 1 or self.resume_epochs < 1:
            raise ValueError("need rollback_limit >= 1, rollback_window >= 1 and "
                             "resume_epochs >= 1")


@dataclass(frozen=True)
class Instability:
    epoch: int
    signal: str  # one of SIGNALS
    detail: str


@dataclass(frozen=True)
class GrowthPause:
    """Growth is paused because of `cause` (the newest instability) until `resumes_at`, the
    first epoch decided with growth again if no instability comes before it."""

    cause: Instability
    resumes_at: int

    def describe(self) -> str:
        return (f"growth paused: {self.cause.signal} at epoch {self.cause.epoch} "
                f"({self.cause.detail}); resumes at epoch {self.resumes_at} if stable")


def metric_spikes(metrics: Mapping[int, float], *, higher_is_better: bool,
                  config: StabilityConfig) -> list[Instability]:
    """Every epoch whose metric spiked against its baseline (the metrics of the epochs before
    it, in epoch order; epochs without a finite metric are skipped)."""
    sign = 1.0 if higher_is_better else -1.0
    history = [(e, m) for e, m in sorted(metrics.items()) if math.isfinite(m)]
    spikes = []
    for i, (epoch, value) in enumerate(history):
        baseline = [m for _, m in history[max(0, i - config.baseline_epochs):i]]
        if len(baseline) < config.min_baseline_epochs:
            continue
        median = statistics.median(baseline)
        mad = statistics.median(abs(m - median) for m in baseline)
        spread = max(mad, config.min_spread * abs(median))
        worse = sign * (median - value)
        if worse > 0 and (spread == 0 or worse > config.spike_mads * spread):
            what = "fell" if higher_is_better else "rose"
            mads = f"{worse / spread:.1f} MADs" if spread else "no spread"
            spikes.append(Instability(epoch, "metric_spike",
                                      f"validation metric {what} to {value:.4g} from a median "
                                      f"of {median:.4g}, {mads}"))
    return spikes


def rollback_bursts(rollback_epochs: Iterable[int],
                    config: StabilityConfig) -> list[Instability]:
    """Every epoch at which a rollback made `rollback_limit` or more within `rollback_window`
    epochs (that epoch and the window - 1 before it)."""
    epochs = sorted(rollback_epochs)
    bursts = []
    first = 0  # the oldest rollback inside the window ending at `epoch`
    for i, epoch in enumerate(epochs):
        while epochs[first] <= epoch - config.rollback_window:
            first += 1
        count = i + 1 - first
        # One per epoch: the last of that epoch's rollbacks, which counts them all.
        if count >= config.rollback_limit and (i + 1 == len(epochs) or epochs[i + 1] != epoch):
            bursts.append(Instability(epoch, "rollbacks", f"{count} seeds rolled back within "
                                      f"{config.rollback_window} epochs"))
    return bursts


def drift_instability(epoch: int, drift: Iterable[float],
                      config: StabilityConfig) -> Instability | None:
    """The blended seeds' drift at `epoch` (NaN: not measured) over the limit, or None."""
    worst = max((d for d in drift if not math.isnan(d)), default=None)
    if worst is None or worst <= config.drift_limit:
        return None
    return Instability(epoch, "drift", f"a blended seed's weight drift is {worst:.3g} "
                       f"(limit {config.drift_limit:g})")


def growth_pause(epoch: int, instabilities: Iterable[Instability],
                 config: StabilityConfig) -> GrowthPause | None:
    """The pause at `epoch`'s decision: the newest instability up to `epoch` (on the same epoch,
    the first of SIGNALS), if fewer than `resume_epochs` epochs have passed since."""
    seen = [i for i in instabilities if i.epoch <= epoch]
    if not seen:
        return None
    cause = max(seen, key=lambda i: (i.epoch, -SIGNALS.index(i.signal)))
    if epoch - cause.epoch >= config.resume_epochs:
        return None
    return GrowthPause(cause, cause.epoch + config.resume_epochs)
