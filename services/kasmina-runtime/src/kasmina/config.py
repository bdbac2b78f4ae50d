"""`KasminaConfig`: every number the seed lifecycle, grafting and telemetry use (DESIGN §3)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class KasminaConfig:
    # Germination guard: seeds in GERMINATED..FINE_TUNING per layer.
    max_active_seeds: int = 4
    # TRAINING -> GRAFTING: mse(bp(x), x) / var(x) <= reconstruction_threshold after
    # min_training_steps; TRAINING -> CULLED when not passed within max_training_epochs.
    reconstruction_threshold: float = 0.05
    min_training_steps: int = 50
    max_training_epochs: int = 5
    # GRAFTING: alpha ramp (one update per training step; every strategy uses this clock). A
    # seed whose BlueprintSpec has its own ramp_steps ramps over that instead.
    ramp_steps: int = 30
    drift_threshold: float = 0.12
    drift_ema: float = 0.9
    grad_norm_lower: float = 0.1
    grad_norm_upper: float = 1.0
    # Stages after grafting.
    stabilization_epochs: int = 3
    evaluation_epochs: int = 2
    evaluation_min_gain: float = 0.0
    fine_tuning_epochs: int = 3
    fossilize_min_gain: float = 0.001
    embargo_epochs: int = 10
    # Direction of the validation metric passed to end_epoch: "max" (accuracy) or "min" (a
    # loss). The controllers carry their own `mode` to the layers they drive.
    mode: str = "max"
    # "chunked": seeds over chunks, the 11-stage lifecycle. "legacy": one seed over the whole
    # layer and the short lifecycle (DESIGN §9; KasminaLayer with num_seeds=1, or the legacy
    # side of a DualPathLayer).
    execution_path: str = "chunked"
    # Blend: by default the blueprint sees the host output detached, so the host's gradient is
    # exactly its (1 - alpha) share.
    isolate_host_in_blend: bool = True
    # TRAINING: the blueprint's output also enters the layer's output with value 0 and gradient
    # share s (out = h + s * (y - y.detach()) on its chunk; the forward returns h itself), so
    # besides reconstructing it learns the task loss's first-order signal as if blended at
    # alpha s. The output and the host's gradients stay exactly a run without the seed's.
    # In [0, 1]; 0 (DESIGN's lifecycle): reconstruction alone. Not with a GradScaler (the task
    # gradient would arrive scaled, the reconstruction's not).
    training_task_share: float = 0.0
    # Safety triggers published as ROLLED_BACK readiness (non-finite values roll back at once).
    rollback_drift_limit: float = 1.0
    rollback_grad_norm_limit: float = 1e3
    # Banks, fixed at construction so the layer's parameters never change (DDP, FSDP2,
    # optimizers and torch.compile follow them): one bank per catalog blueprint named here that
    # fits some chunk (None: every registered blueprint), each with `bank_slots` slots, the
    # most seeds of that blueprint that can be running or fossilised at once (0: min(num_seeds,
    # 4 * max_active_seeds)). Every slot of a bank in use runs each step.
    blueprints: tuple[str, ...] | None = None
    bank_slots: int = 0
    # Each bank of a kind with a hidden width (a rank) is built at least this wide (0: its
    # catalog entry's own size), so a spec of that kind and activation received later, up to this
    # size, grows in it (a Germinate carrying a spec Karn proposed). The bank computes at this
    # size every step a slot of it runs.
    bank_hidden: int = 0
    bank_rank: int = 0
    # The seeds' own optimizer (Adam over the blueprint banks). A seed whose BlueprintSpec has
    # its own seed_lr steps at that rate instead. 3e-3, chosen by the efficacy harness with the
    # controller's defaults (benchmarks/NOTES.md, "Which of the candidate's six changes pay";
    # 1e-3 paid on no task).
    seed_lr: float = 3e-3
    seed_betas: tuple[float, float] = (0.9, 0.999)
    seed_eps: float = 1e-8
    seed_weight_decay: float = 0.0
    # Telemetry: accumulate every k-th training step; correlation is sampled on at most
    # correlation_features features per chunk and correlation_rows rows per step.
    telemetry_every: int = 1
    # Also accumulate, every training step, the task loss's gradient at the layer's output,
    # squared, per feature (float64): reports carry its mean per seed (output_grad_sq), the
    # signal of placement="gradient" (ControllerConfig, Tamiyo's TAMIYO_PLACEMENT). One pass
    # over the output gradient a step; off by default; eager only (a compiled layer's forward
    # adds nothing: its reports say NaN, and placement falls back to health).
    track_output_gradient: bool = False
    dead_threshold: float = 1e-6
    correlation_features: int = 16
    correlation_rows: int = 256
    # "auto": fused Triton kernels on CUDA, the PyTorch reference elsewhere; "triton" or
    # "torch" forces one (the two agree to kasmina.kernels.tolerances.TOLERANCES).
    kernels: str = "auto"
    # Replay a growing layer's forward (host and seeds), backward and seed step as CUDA graphs
    # (kasmina.graphs), for layers whose step is bound by the host CPU. "auto": a host that is
    # exactly nn.Linear or Conv1D with no hooks and a small GEMM (graphs.AUTO_MACS); True:
    # wherever the rules of kasmina.graphs hold (the host's forward hooks then run at capture
    # only); False: never. Eager on the CPU, under torch.distributed, in eval mode and with a
    # GradScaler's step whatever this says.
    cuda_graphs: bool | str = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_gain"):  # gain thresholds may be negative
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"KasminaConfig.{f.name} must be >= 0, got {value}")
        if self.execution_path not in ("chunked", "legacy"):
            raise ValueError(f"KasminaConfig.execution_path must be 'chunked' or 'legacy', got "
                             f"{self.execution_path!r}")
        if self.bank_hidden < 0 or self.bank_rank < 0:
            raise ValueError("KasminaConfig.bank_hidden and bank_rank must be >= 0")
        if self.ramp_steps < 1 or self.telemetry_every < 1:
            raise ValueError("KasminaConfig.ramp_steps and telemetry_every must be >= 1")
        if self.grad_norm_lower > self.grad_norm_upper:
            raise ValueError("KasminaConfig.grad_norm_lower must be <= grad_norm_upper")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError("KasminaConfig.kernels must be auto, triton or torch: "
                             f"{self.kernels!r}")
        if self.cuda_graphs not in ("auto", True, False):
            raise ValueError("KasminaConfig.cuda_graphs must be 'auto', True or False: "
                             f"{self.cuda_graphs!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"KasminaConfig.mode must be 'max' or 'min', got {self.mode!r}")
        if not 0.0 <= self.drift_ema < 1.0:
            raise ValueError("KasminaConfig.drift_ema must be in [0, 1)")
        if not 0.0 <= self.training_task_share <= 1.0:
            raise ValueError("KasminaConfig.training_task_share must be in [0, 1], got "
                             f"{self.training_task_share}")

    @property
    def sign(self) -> float:
        """+1 when a larger metric is better, -1 when smaller is."""
        return 1.0 if self.mode == "max" else -1.0

    def replace(self, **changes: object) -> KasminaConfig:
        return dataclasses.replace(self, **changes)
