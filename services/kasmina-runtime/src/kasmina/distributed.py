"""Seed layers under torch.distributed (DESIGN §8): every rank makes the same decision.

A seed layer's blueprint parameters and rank-local buffers are kept out of DDP (its gradient
all-reduce and its buffer broadcast): the seeds' own optimizer all-reduces the blueprints'
gradients itself (`KasminaLayer.step`), and the statistics gates read (telemetry sums,
reconstruction ratios, non-finite flags) are reduced across ranks at the epoch boundary, so the
stage tables stay identical without any broadcast. Everything here is a no-op in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average `tensors` in place across ranks, as one flat all-reduce."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_(tensors: list[torch.Tensor], op: str = "sum") -> None:
    """Sum (or "max") `tensors` in place across ranks, one collective each."""
    if world_size() == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)


def broadcast_object(obj: object, src: int = 0) -> object:
    """`obj` as rank `src` has it, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def ddp_ignored_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the parameters and buffers of every seed layer that DDP must
    neither all-reduce nor broadcast: everything but the host layer's own."""
    from .layer import KasminaLayer

    names = []
    for path, module in model.named_modules():
        if not isinstance(module, KasminaLayer):
            continue
        prefix = f"{path}." if path else ""
        for name, _ in [*module.named_parameters(), *module.named_buffers()]:
            if not name.startswith("host."):
                names.append(prefix + name)
    return names


def prepare_ddp(model: nn.Module) -> nn.Module:
    """Mark a model's seed-layer tensors for DDP to leave alone; call before wrapping it in
    `DistributedDataParallel` (`kasmina.wrap` does it for the model it wraps)."""
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(ignored | set(ddp_ignored_names(model)))
    return model


def check_ddp(model: nn.Module) -> None:
    """A DDP-wrapped model must leave the seed layers' tensors alone (`prepare_ddp` before
    wrapping); otherwise its broadcast overwrites other ranks' statistics and its all-reduce
    fights the seeds' own, so ranks would silently diverge."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return
    missing = set(ddp_ignored_names(model.module)) - set(model.parameters_to_ignore)
    if missing:
        raise ValueError(f"DistributedDataParallel manages {len(missing)} seed-layer tensors "
                         f"(e.g. {sorted(missing)[0]!r}): call kasmina.wrap(model) or "
                         "kasmina.prepare_ddp(model) before wrapping the model in DDP")
