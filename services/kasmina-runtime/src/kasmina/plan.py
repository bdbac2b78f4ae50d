"""`ForwardPlan`: the index tensors the forward pass and the seed step use, rebuilt from the
host-side stage table whenever a seed changes stage (never per step), so the hot path reads no
state back from the device and launches the same ops whatever the number of seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .lifecycle import BLENDING_STAGES, RUNNING_STAGES, TRAINABLE_STAGES, SeedStage

STAGE, BLUEPRINT_ID, EPOCHS_IN_STAGE, STRATEGY = range(4)  # columns of the `state` buffer


@dataclass
class ForwardPlan:
    num_running: int = 0
    seeds: torch.Tensor | None = None  # (A,) running seeds, grouped by blueprint id
    slots: torch.Tensor | None = None  # (A,) their bank slots
    segments: list[tuple[str, int, int]] = field(default_factory=list)  # (bank key, start, end)
    gather_idx: torch.Tensor | None = None  # (A * C,) host feature of each chunk position
    valid: torch.Tensor | None = None  # (A, 1, C) 1.0 on real features; None if no padding
    feat: torch.Tensor | None = None  # (M,) host features of the running seeds
    run_of: torch.Tensor | None = None  # (F,) int32 running index of each feature's seed, or -1
    bounds: torch.Tensor | None = None  # (A, 2) int32 first host feature and width per chunk
    align: int = 1  # largest power of two <= 16 dividing every running chunk's start, width
    sizes: torch.Tensor | None = None  # (A,) chunk widths, float
    blend: torch.Tensor | None = None  # (A,) 1.0 where the seed's output is blended in
    train: torch.Tensor | None = None  # (A,) bool, TRAINING (reconstruction loss)
    through: torch.Tensor | None = None  # (A, 1, 1) 1.0 where host gradient flows through bp
    has_blend: bool = False
    has_train: bool = False
    grafting: dict[int, torch.Tensor] = field(default_factory=dict)  # strategy id -> seeds
    trainable: dict[str, torch.Tensor] = field(default_factory=dict)  # bank key -> (cap,) bool


def build_plan(state: np.ndarray, slot: np.ndarray, chunks: list[tuple[int, int]], width: int,
               capacities: dict[str, int], isolate: bool, counterfactual: set[int],
               device: torch.device) -> ForwardPlan:
    stage = state[:, STAGE]
    running = np.flatnonzero(np.isin(stage, list(RUNNING_STAGES)))
    if running.size == 0:
        return ForwardPlan()
    running = running[np.argsort(state[running, BLUEPRINT_ID], kind="stable")]
    bp = state[running, BLUEPRINT_ID]
    segments, start = [], 0
    for key in dict.fromkeys(bp.tolist()):
        end = start + int((bp == key).sum())
        segments.append((str(key), start, end))
        start = end

    starts = np.array([chunks[s][0] for s in running])
    sizes = np.array([chunks[s][1] - chunks[s][0] for s in running])
    pos = np.arange(width)
    valid = pos[None, :] < sizes[:, None]  # (A, C)
    gather = starts[:, None] + np.minimum(pos[None, :], sizes[:, None] - 1)  # (A, C)
    run_stage = stage[running]
    blend = np.isin(run_stage, list(BLENDING_STAGES)) & ~np.isin(running, list(counterfactual))
    train = run_stage == SeedStage.TRAINING
    through = (run_stage == SeedStage.FOSSILIZED) | (blend & (not isolate))

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a).to(device=device, dtype=dtype)

    features = chunks[-1][1]
    run_of = np.full(features, -1, dtype=np.int32)
    feat = gather[valid]  # (M,)
    run_of[feat] = np.repeat(np.arange(len(running)), sizes)
    common = int(np.gcd.reduce(np.concatenate([starts, sizes, [16]])))  # divides 16
    padded = not valid.all()
    plan = ForwardPlan(
        num_running=len(running), seeds=t(running, torch.long),
        slots=t(slot[running], torch.long), segments=segments,
        gather_idx=t(gather.reshape(-1), torch.long),
        valid=t(valid[:, None, :], torch.float32) if padded else None,
        feat=t(feat, torch.long), run_of=t(run_of, torch.int32),
        bounds=t(np.stack([starts, sizes], axis=1), torch.int32), align=common,
        sizes=t(sizes, torch.float32), blend=t(blend, torch.float32), train=t(train, torch.bool),
        through=t(through[:, None, None], torch.float32) if through.any() else None,
        has_blend=bool(blend.any()), has_train=bool(train.any()))
    grafting = running[run_stage == SeedStage.GRAFTING]
    for sid in np.unique(state[grafting, STRATEGY]):
        plan.grafting[int(sid)] = t(grafting[state[grafting, STRATEGY] == sid], torch.long)
    trainable = running[np.isin(run_stage, list(TRAINABLE_STAGES))]
    for key, cap in capacities.items():
        mask = np.zeros(cap, dtype=bool)
        mine = trainable[state[trainable, BLUEPRINT_ID] == int(key)]
        mask[slot[mine]] = True
        plan.trainable[key] = t(mask, torch.bool)
    return plan
