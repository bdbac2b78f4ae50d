"""Lanes: the fixed-shape tensors the forward pass and the seed step read (DESIGN §3.1).

A layer has L lanes, one per bank slot, laid out bank after bank at construction. What a lane
does this step (whose chunk it reads, whether it blends, trains or lets the host's gradient
through) lives in these tensors, rewritten in place at each commit from the `SeedTable`, never
in Python structure: a stage change, a germination or an alpha change is a tensor update, so
`torch.compile` never recompiles for it and DDP sees the same parameters throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .blueprints import get_blueprint
from .config import KasminaConfig
from .lifecycle import BLENDING_STAGES, RUNNING_STAGES, TRAINABLE_STAGES, SeedStage
from .seed_table import BLUEPRINT_ID, STAGE, STRATEGY, SeedTable

# name -> (dtype, shape as a function of (L, W, F))
LANE_TENSORS: dict[str, tuple[torch.dtype, object]] = {
    "lane_index": (torch.long, lambda L, W, F: (L,)),  # seed of the lane (0 when free)
    "lane_gather": (torch.long, lambda L, W, F: (L * W,)),  # host feature per chunk position
    "lane_valid": (torch.float32, lambda L, W, F: (L, 1, W)),  # 1 on real, used features
    "lane_through": (torch.float32, lambda L, W, F: (L, 1, 1)),  # host gradient through bp
    "lane_blend": (torch.float32, lambda L, W, F: (L,)),  # 1 where the output is blended in
    "lane_train": (torch.bool, lambda L, W, F: (L,)),  # TRAINING: reconstruction loss
    "lane_trainable": (torch.bool, lambda L, W, F: (L,)),  # the seed optimizer steps it
    "lane_running": (torch.bool, lambda L, W, F: (L,)),  # the blueprint runs (stage counter)
    "lane_sizes": (torch.float32, lambda L, W, F: (L,)),  # chunk width (1 when free)
    "run_of": (torch.int32, lambda L, W, F: (F,)),  # running lane of each host feature, or -1
    "bounds": (torch.int32, lambda L, W, F: (L, 2)),  # running chunk's first feature, width
    # The seed's spec's own seed_lr (0 where it leaves it to KasminaConfig.seed_lr, which the
    # fused step reads in the same launch) and its ramp length (the spec's, else the config's:
    # resolved here, so a grafting step reads it with no extra op).
    "lane_lr": (torch.float32, lambda L, W, F: (L,)),
    "lane_ramp_steps": (torch.float32, lambda L, W, F: (L,)),
}


@dataclass
class LaneFlags:
    """What the table says about the lanes, for eager-mode shortcuts (never read under
    torch.compile, which always runs every lane)."""

    live: bool = False  # some lane runs its blueprint
    has_train: bool = False
    has_blend: bool = False
    has_through: bool = False
    banks: tuple[str, ...] = ()  # banks with a running lane
    fused: bool = False  # kasmina.fused can run them (set by the layer, which knows its banks)
    # strategy id -> (grafting seeds, their lanes)
    grafting: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


def build_lanes(table: SeedTable, width: int, config: KasminaConfig, bank_of_lane: np.ndarray,
                keys: list[str], device: torch.device
                ) -> tuple[dict[str, np.ndarray], LaneFlags]:
    num_lanes, features = table.num_lanes, table.chunks[-1][1]
    owner = table.lane_owner()  # (L,)
    used = owner >= 0
    seed = np.maximum(owner, 0)
    starts = np.array([table.chunks[s][0] for s in seed]) if num_lanes else np.zeros(0, int)
    sizes = np.where(used, table.widths[seed], 0) if num_lanes else np.zeros(0, int)
    stage = np.where(used, table.state[seed, STAGE], SeedStage.DORMANT)
    running = used & np.isin(stage, list(RUNNING_STAGES))
    blend = (running & np.isin(stage, list(BLENDING_STAGES))
             & ~np.isin(owner, list(table.counterfactual)))
    train = running & (stage == SeedStage.TRAINING)
    through = running & ((stage == SeedStage.FOSSILIZED)
                         | (blend & (not config.isolate_host_in_blend)))
    trainable = running & np.isin(stage, list(TRAINABLE_STAGES))
    pos = np.arange(width)
    gather = starts[:, None] + np.minimum(pos[None, :], np.maximum(sizes, 1)[:, None] - 1)
    valid = (pos[None, :] < sizes[:, None]) & running[:, None]
    run_of = np.full(features, -1, dtype=np.int32)
    run_of[gather[valid]] = np.repeat(np.arange(num_lanes), valid.sum(1))
    own = [get_blueprint(int(b)) for b in table.state[seed[used], BLUEPRINT_ID]]  # seeds' specs
    lr, ramp = np.zeros(num_lanes), np.zeros(num_lanes)
    lr[used], ramp[used] = [s.seed_lr for s in own], [s.ramp_steps for s in own]
    ramp = np.where(ramp > 0, ramp, config.ramp_steps)
    arrays = {
        "lane_index": seed, "lane_gather": gather.reshape(-1), "lane_valid": valid[:, None, :],
        "lane_through": through[:, None, None], "lane_blend": blend, "lane_train": train,
        "lane_trainable": trainable, "lane_running": running,
        "lane_sizes": np.maximum(sizes, 1), "run_of": run_of, "lane_lr": lr,
        "lane_ramp_steps": ramp,
        "bounds": np.stack([np.where(running, starts, 0), np.where(running, sizes, 0)], 1)
        if num_lanes else np.zeros((0, 2), dtype=np.int32)}

    grafting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    lanes = np.flatnonzero(running & (stage == SeedStage.GRAFTING))
    strategy = table.state[owner[lanes], STRATEGY] if lanes.size else np.zeros(0, int)
    for sid in np.unique(strategy):
        mine = lanes[strategy == sid]
        grafting[int(sid)] = (torch.as_tensor(owner[mine], device=device),
                              torch.as_tensor(mine, device=device))
    flags = LaneFlags(
        live=bool(running.any()), has_train=bool(train.any()), has_blend=bool(blend.any()),
        has_through=bool(through.any()),
        banks=tuple(k for i, k in enumerate(keys) if running[bank_of_lane == i].any()),
        grafting=grafting)
    return arrays, flags
