"""On-device per-seed telemetry (DESIGN §3.4) and the typed `LayerHealthReport`.

The forward pass adds per-feature column statistics (from `kasmina.kernels`) into device
buffers; nothing is read back until `summarize`, which runs at an epoch boundary, sums features
into seeds and makes one transfer. Correlation is sampled: at most `correlation_features`
evenly spaced features of each chunk and the first `correlation_rows` rows of each
accumulated batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import distributed, kernels
from .config import KasminaConfig
from .kernels import interpreting
from .lifecycle import SeedStage


class SeedTelemetry(nn.Module):
    def __init__(self, chunks: list[tuple[int, int]], cfg: KasminaConfig,
                 device: torch.device) -> None:
        super().__init__()
        num_seeds = len(chunks)
        sizes = torch.tensor([e - s for s, e in chunks], dtype=torch.float64)
        widest = int(sizes.max())
        self.k = k = max(1, min(cfg.correlation_features, widest))
        self.rows_sampled = cfg.correlation_rows
        starts = torch.tensor([s for s, _ in chunks])
        seed_of = torch.repeat_interleave(torch.arange(num_seeds), sizes.long())  # (F,)
        # k evenly spaced (distinct) features per chunk; a chunk narrower than k takes all its
        # features and pads with its last one, masked out by `valid`.
        j = torch.arange(k).unsqueeze(0)  # (1, k)
        size = sizes.long().unsqueeze(1)  # (S, 1)
        offs = torch.where(size >= k, (j * size) // k, torch.minimum(j, size - 1))  # (S, k)
        valid = j < size  # (S, k)
        corr_idx = (starts.unsqueeze(1) + offs).flatten()  # (S * k,)
        for name, t in (("seed_of", seed_of), ("sizes", sizes), ("corr_idx", corr_idx),
                        ("corr_valid", valid)):
            self.register_buffer(name, t.to(device), persistent=False)
        f64 = dict(dtype=torch.float64, device=device)
        features = int(sizes.sum())
        # Per host feature: sum, sum of squares, count of |x| < dead_threshold; summed into
        # seeds only at the epoch boundary, so the step's pass needs no per-seed reduction.
        self.register_buffer("columns", torch.zeros(3, features, **f64))
        self.register_buffer("rows", torch.zeros((), **f64))
        self.register_buffer("corr_sum", torch.zeros(num_seeds, k, **f64))
        self.register_buffer("corr_prod", torch.zeros(num_seeds, k, k, **f64))
        self.register_buffer("corr_n", torch.zeros((), **f64))
        # KasminaConfig.track_output_gradient: per feature, the sum of the squared output
        # gradient, and the rows it summed over (not in checkpoints: those of earlier
        # releases load as they are; a resumed epoch reports what it measured since)
        self.register_buffer("grad_sq", torch.zeros(features, **f64), persistent=False)
        self.register_buffer("grad_rows", torch.zeros((), **f64), persistent=False)

    def observe(self, h2: torch.Tensor, dead_threshold: float, triton: bool) -> None:
        """The telemetry of one step's host output h2 (N, F), detached, where no blend computed
        its column statistics: `add` of `kernels.column_stats`, or in eager CUDA one launch
        (`triton_telemetry.observe`). No grad-mode switch on the launch's path: 3 us a call."""
        if triton and (h2.is_cuda or interpreting()) and h2.stride(1) == 1 and not (
                torch.compiler.is_compiling()):
            from .kernels import triton_telemetry  # (triton imported only where it runs)
            triton_telemetry.observe(h2, dead_threshold, self.corr_idx, self.corr_valid,
                                     self.columns, self.rows, self.corr_sum, self.corr_prod,
                                     self.corr_n, self.rows_sampled)
            return
        with torch.no_grad():
            self.add(kernels.column_stats(h2, dead_threshold, triton), h2, triton)

    @torch.no_grad()
    def add(self, stats: torch.Tensor, h2: torch.Tensor, triton: bool = False) -> None:
        """stats: (3, F) float32 column statistics of h2 (N, F), the host output of one step.
        `triton` (eager CUDA): the same maths in one launch (`kernels/triton_telemetry.py`)."""
        if triton and (h2.is_cuda or interpreting()) and h2.stride(1) == 1 and not (
                torch.compiler.is_compiling()):
            from .kernels import triton_telemetry
            triton_telemetry.add(stats, h2, self.corr_idx, self.corr_valid, self.columns,
                                 self.rows, self.corr_sum, self.corr_prod, self.corr_n,
                                 self.rows_sampled)
            return
        # add_, not +=: `+=` on a module's buffer is a Module.__setattr__ (register_buffer's
        # checks), 53 us of a 279 us tracking step on a 2-core Xeon
        self.columns.add_(stats)
        self.rows.add_(h2.shape[0])
        if self.k == 1:  # chunks of one feature have no pairs to correlate
            return
        sample = h2[: self.rows_sampled].index_select(1, self.corr_idx).float()  # (R, S*k)
        sample = sample.view(sample.shape[0], -1, self.k) * self.corr_valid  # (R, S, k)
        self.corr_sum.add_(sample.sum(0).double())
        self.corr_prod.add_(torch.einsum("rsi,rsj->sij", sample, sample).double())
        self.corr_n.add_(sample.shape[0])

    @torch.no_grad()
    def observe_gradient(self, grad: torch.Tensor) -> None:
        """One backward's gradient at the layer's output (..., F)."""
        g2 = grad.detach().reshape(-1, grad.shape[-1])
        self.grad_sq.add_(g2.double().square().sum(0))
        self.grad_rows.add_(g2.shape[0])

    @torch.no_grad()
    def summarize(self) -> dict[str, torch.Tensor]:
        """Per-seed (S,) float64 device tensors: chunk_variance, dead_ratio,
        mean_abs_correlation, output_grad_sq (the mean squared output gradient of the chunk).
        NaN where nothing was accumulated."""
        per_seed = self.columns.new_zeros(4, len(self.sizes)).index_add_(
            1, self.seed_of, torch.cat([self.columns, self.grad_sq[None]]))
        total, squares, dead, grad_sq = per_seed
        count = (self.rows * self.sizes).clamp(min=1)
        mean = total / count
        var = (squares / count - mean.square()).clamp(min=0)
        n = self.corr_n.clamp(min=1)
        mu = self.corr_sum / n  # (S, k)
        cov = self.corr_prod / n - mu.unsqueeze(2) * mu.unsqueeze(1)  # (S, k, k)
        std = torch.diagonal(cov, dim1=1, dim2=2).clamp(min=0).sqrt()  # (S, k)
        live = self.corr_valid & (std > 1e-12)
        pair = live.unsqueeze(2) & live.unsqueeze(1)
        pair &= ~torch.eye(self.k, dtype=torch.bool, device=pair.device)
        corr = cov / (std.unsqueeze(2) * std.unsqueeze(1)).clamp(min=1e-24)
        abs_corr = torch.where(pair, corr.abs().clamp(max=1.0), 0.0).sum((1, 2))
        mean_abs_corr = abs_corr / pair.sum((1, 2)).clamp(min=1)
        nan = torch.full_like(var, float("nan"))
        empty = self.rows == 0
        return {"chunk_variance": torch.where(empty, nan, var),
                "dead_ratio": torch.where(empty, nan, dead / count),
                "mean_abs_correlation": torch.where(empty, nan, mean_abs_corr),
                "output_grad_sq": torch.where(
                    self.grad_rows == 0, nan, grad_sq / (self.grad_rows * self.sizes).clamp(min=1))}

    @torch.no_grad()
    def reduce_across_ranks(self) -> None:
        """Sum every rank's accumulators (all additive), so every rank summarises the same.
        The output gradients' squares are then divided by world²: DDP averages the ranks'
        gradients, so the loss it minimises is the mean of the ranks' losses and its gradient
        at a row is the rank's over world. With a loss that is a mean over the rows (the usual
        one) the report then reads as one process's on the whole batch would (test_distributed
        checks the values)."""
        distributed.all_reduce_([self.columns, self.rows, self.corr_sum, self.corr_prod,
                                 self.corr_n, self.grad_sq, self.grad_rows])
        if (world := distributed.world_size()) > 1:
            self.grad_sq.div_(world**2)

    @torch.no_grad()
    def reset(self) -> None:
        for t in (self.columns, self.rows, self.corr_sum, self.corr_prod, self.corr_n,
                  self.grad_sq, self.grad_rows):
            t.zero_()


@dataclass
class SeedHealth:
    seed_id: int
    stage: SeedStage
    blueprint_id: int
    epochs_in_stage: int
    strategy_id: int
    alpha: float
    chunk_variance: float
    dead_ratio: float
    mean_abs_correlation: float
    reconstruction_ratio: float
    grad_norm: float
    drift: float
    contribution: float
    ready_for: SeedStage | None


@dataclass
class LayerHealthReport:
    """One layer's health at an epoch boundary, column-wise (one numpy array per metric, one
    entry per seed) so thousands of seeds cost one array each. NaN means "not measured"."""

    layer_id: str
    epoch: int
    step: int
    val_metric: float | None
    stage: np.ndarray  # int32
    blueprint_id: np.ndarray  # int32, -1 when none
    epochs_in_stage: np.ndarray  # int32
    strategy_id: np.ndarray  # int32, -1 when none
    alpha: np.ndarray  # float32 from here on
    chunk_variance: np.ndarray
    dead_ratio: np.ndarray
    mean_abs_correlation: np.ndarray
    reconstruction_ratio: np.ndarray
    grad_norm: np.ndarray
    drift: np.ndarray
    contribution: np.ndarray
    # the mean squared task-loss gradient at the seed's chunk of the output over the epoch
    # (KasminaConfig.track_output_gradient; NaN when off)
    output_grad_sq: np.ndarray
    ready_for: np.ndarray  # int32 target stage, -1 when none
    chunks: list[tuple[int, int]] = field(repr=False, default_factory=list)

    @property
    def num_seeds(self) -> int:
        return len(self.stage)

    def seed(self, seed_id: int) -> SeedHealth:
        ready = int(self.ready_for[seed_id])
        return SeedHealth(
            seed_id=seed_id, stage=SeedStage(int(self.stage[seed_id])),
            blueprint_id=int(self.blueprint_id[seed_id]),
            epochs_in_stage=int(self.epochs_in_stage[seed_id]),
            strategy_id=int(self.strategy_id[seed_id]),
            ready_for=None if ready < 0 else SeedStage(ready),
            **{k: float(getattr(self, k)[seed_id]) for k in (
                "alpha", "chunk_variance", "dead_ratio", "mean_abs_correlation",
                "reconstruction_ratio", "grad_norm", "drift", "contribution")})

    def stage_counts(self) -> dict[str, int]:
        values, counts = np.unique(self.stage, return_counts=True)
        return {SeedStage(int(v)).name: int(c) for v, c in zip(values, counts, strict=True)}
