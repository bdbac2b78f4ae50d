"""The guarded rollout's statistics (DESIGN §9): an always-valid sequential comparison of a
per-job outcome between the legacy path (control) and the chunked path (treatment), with CUPED.

The test is the mixture sequential probability ratio test (mSPRT) with a normal mixing
distribution of Johari, Koomen, Pekelis and Walsh ("Always valid inference", 2017/2022), in the
two-sample form with unequal arms, and its inversion, the normal-mixture confidence sequence of
Howard, Ramdas, McAuliffe and Sekhon ("Time-uniform, nonparametric, nonasymptotic confidence
sequences", 2021). With the estimate D = (mean_t(Y') - mean_c(Y')) of the difference
delta = E[Y | treatment] - E[Y | control], its variance V = s_t^2 / n_t + s_c^2 / n_c and a
N(0, tau^2) mixture over delta:

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 * D^2 / (2 V (V + tau^2)))

For normal outcomes of known variance, D / V is a Brownian motion with drift delta in the
information time 1 / V whatever the allocation (each job's path chosen before its outcome), so
Lambda is a nonnegative martingale under delta = 0 and, by Ville's inequality,
P(Lambda ever >= 1 / alpha) <= alpha: peeking after every job does not inflate false alarms.
Inverting it at every delta gives the confidence sequence, valid at all times at once:

    delta in D +- sqrt(V (V + tau^2) / tau^2 * log((V + tau^2) / (V alpha^2)))

The variances are plug-in estimates (each arm's sample variance), so the guarantee is
asymptotic (Waudby-Smith et al., "Time-uniform central limit theory", 2021); a minimum number
of jobs per path keeps the first looks from resting on a handful of them (measured: see
SequentialConfig.min_jobs_per_path). Give skewed outcomes (step time) on a log scale. tau is
`mixture_sd` times the pooled sd of Y: the effect size the test is most sensitive to.

CUPED (Deng, Xu, Kohavi and Walker, 2013): Y' = Y - theta * (X - mean(X)), X each job's
pre-germination metric (untouched by the path), theta = cov(Y, X) / var(X) over both paths
pooled. The mean difference stays unbiased and its variance shrinks by (1 - rho^2).

Decision (`margin` >= 0, in Y's units, oriented by `higher_is_better`): roll back when the
whole sequence says the new path is worse by more than the margin, promote when it says it is
not, hold otherwise. With margin 0 that is the two-sided test of delta = 0.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray


class Verdict(enum.StrEnum):
    PROMOTE = "promote"
    HOLD = "hold"
    ROLL_BACK = "roll_back"


_CODES = {1: Verdict.PROMOTE, 0: Verdict.HOLD, -1: Verdict.ROLL_BACK}


@dataclass(frozen=True)
class SequentialConfig:
    alpha: float = 0.05  # P(a wrong promote or roll back, ever) under continuous monitoring
    # tau / sd(Y): the scale of the differences the test is tuned to (Johari et al.: near the
    # effects one expects); half a standard deviation is the regression size the tests plant
    mixture_sd: float = 0.5
    # No verdict before each path has this many jobs: with fewer, the plug-in variances swing
    # widely. A/A false alarms at a 10 % canary, peeking after every job, 2,000 simulated
    # experiments of 1,000 normal jobs: 7.9 % at 5, 2.7 % at 20. Skewed outcomes need more or a
    # transform: exponential ones gave 5.9 % at 20, 2.0 % at 50, and 3.8 % at 20 after a log.
    min_jobs_per_path: int = 20
    higher_is_better: bool = True
    margin: float = 0.0
    cuped: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError("alpha must be in (0, 1)")
        if self.mixture_sd <= 0:
            raise ValueError("mixture_sd must be > 0")
        if self.min_jobs_per_path < 2:
            raise ValueError("min_jobs_per_path must be >= 2 (a variance needs two jobs)")
        if self.margin < 0:
            raise ValueError("margin must be >= 0")


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of one path's jobs: counts and sums of Y, X, Y^2, X^2, XY. Each
    field may be an array (any shape, broadcast together): one comparison per element."""

    n: Any
    y: Any
    x: Any
    yy: Any
    xx: Any
    xy: Any

    @classmethod
    def of(cls, outcome: ArrayLike, pre_metric: ArrayLike | None = None) -> Moments:
        """Of one path's jobs (the pre-germination metric optional: without it, no CUPED)."""
        y = np.asarray(outcome, dtype=np.float64)
        x = np.zeros_like(y) if pre_metric is None else np.asarray(pre_metric, np.float64)
        if y.shape != x.shape or y.ndim != 1:
            raise ValueError("outcome and pre_metric must be 1-D and of one length")
        return cls(float(y.size), y.sum(), x.sum(), (y * y).sum(), (x * x).sum(), (x * y).sum())

    @classmethod
    def cumulative(cls, outcome: ArrayLike, pre_metric: ArrayLike, member: ArrayLike
                   ) -> Moments:
        """After each job along the last axis, of the jobs where `member` is true: the
        statistics a monitor peeking after every job sees."""
        y, x = np.asarray(outcome, np.float64), np.asarray(pre_metric, np.float64)
        m = np.asarray(member, dtype=np.float64)
        return cls(*(np.cumsum(m * v, axis=-1) for v in (np.ones_like(y), y, x, y * y, x * x,
                                                          x * y)))

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.y + other.y, self.x + other.x,
                       self.yy + other.yy, self.xx + other.xx, self.xy + other.xy)


@dataclass(frozen=True)
class Comparison:
    """delta = mean(treatment) - mean(control) of Y: the estimate and the confidence sequence
    (floats, or arrays like the Moments'); `ready` once both paths have min_jobs_per_path."""

    estimate: Any
    variance: Any  # V, of the estimate
    lower: Any
    upper: Any
    theta: Any  # the CUPED coefficient used (0 without)
    n_control: Any
    n_treatment: Any
    ready: Any
    codes: Any  # 1 promote, 0 hold, -1 roll back

    @property
    def verdict(self) -> Verdict:
        """The verdict of a single comparison."""
        return _CODES[int(np.asarray(self.codes).item())]


def _centred(n: Any, s: Any, t: Any, st: Any) -> Any:
    """The sample covariance of two variables from their sums (n - 1 denominator)."""
    return (st - s * t / n) / (n - 1)


def compare(control: Moments, treatment: Moments,
            config: SequentialConfig = SequentialConfig()) -> Comparison:
    """The always-valid comparison of the module docstring (vectorised over array Moments)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = control + treatment
        var_y = _centred(pooled.n, pooled.y, pooled.y, pooled.yy)
        var_x = _centred(pooled.n, pooled.x, pooled.x, pooled.xx)
        theta = np.where(config.cuped & (var_x > 0),
                         _centred(pooled.n, pooled.x, pooled.y, pooled.xy) / var_x, 0.0)

        def mean_and_variance(arm: Moments) -> tuple[Any, Any]:
            # of Y' = Y - theta X, per job of the arm
            mean = (arm.y - theta * arm.x) / arm.n
            var = (_centred(arm.n, arm.y, arm.y, arm.yy)
                   - 2 * theta * _centred(arm.n, arm.x, arm.y, arm.xy)
                   + theta ** 2 * _centred(arm.n, arm.x, arm.x, arm.xx))
            return mean, np.maximum(var, 0.0)

        mean_c, var_c = mean_and_variance(control)
        mean_t, var_t = mean_and_variance(treatment)
        estimate = mean_t - mean_c
        v = var_t / treatment.n + var_c / control.n
        tau2 = config.mixture_sd ** 2 * var_y
        radius = np.sqrt(v * (v + tau2) / tau2 * np.log((v + tau2) / (v * config.alpha ** 2)))
        ready = ((control.n >= config.min_jobs_per_path)
                 & (treatment.n >= config.min_jobs_per_path) & (v > 0) & (tau2 > 0))
        lower, upper = estimate - radius, estimate + radius
        sign = 1.0 if config.higher_is_better else -1.0
        # the sequence of the benefit (sign * delta) against -margin
        benefit_low = np.minimum(sign * lower, sign * upper)
        benefit_high = np.maximum(sign * lower, sign * upper)
        codes = np.where(ready & (benefit_high < -config.margin), -1,
                         np.where(ready & (benefit_low > -config.margin), 1, 0))
    return Comparison(estimate, v, lower, upper, theta, control.n, treatment.n, ready, codes)


def first_verdict(codes: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """For codes after each job along the last axis: the first non-hold code (0 when none) and
    the number of jobs seen when it came (the axis length + 1 when none): where a monitor that
    stops at its first verdict stops."""
    c = np.asarray(codes)
    decided = c != 0
    first = np.where(decided.any(axis=-1), decided.argmax(axis=-1), c.shape[-1])
    code = np.take_along_axis(np.concatenate([c, np.zeros(c.shape[:-1] + (1,), c.dtype)],
                                             axis=-1), first[..., None], axis=-1)[..., 0]
    return code.astype(np.int64), (first + 1).astype(np.int64)
