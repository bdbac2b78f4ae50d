"""`KasminaCallback`: a Lightning `Trainer.fit` grows seed layers with the LocalController.

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = kasmina.wrap(make_net(), seeds_per_layer=8)
        def configure_optimizers(self):  # the host's parameters: blueprints have their own
            return torch.optim.Adam(kasmina.host_parameters(self))
        ...  # training_step; validation_step logs "val_loss"
    L.Trainer(callbacks=[KasminaCallback(monitor="val_loss", mode="min")]).fit(Net(), ...)

After each optimizer step (`trainer.global_step` moved: once per step with gradient
accumulation) the callback calls `controller.step` with the step's loss; at the end of each
validation during fit (not the sanity check) `controller.end_epoch` with
`trainer.callback_metrics[monitor]` and an `evaluate` that replays the module's validation:
`validation_step` over the same val dataloaders and batch limits, between the module's
`on_validation_epoch_start` and `on_validation_epoch_end`, with `self.log` captured and the
monitored key reduced as Lightning reduces it (batch-size-weighted mean, sum, max, min, or a
torchmetrics Metric's `compute()`). Lightning cannot run `trainer.validate` inside `fit` (it
replaces the trainer's state), hence the replay; pass `evaluate=` for a metric it cannot
rebuild (one computed in a callback, a custom `reduce_fx`). One process: the LocalController
does not synchronise seeds across ranks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..controller import ControllerConfig, LocalController
from ..extras import requires_extras
from .common import blueprint_parameters_in, step_loss, with_mode

with requires_extras("kasmina.integrations.lightning", "lightning"):
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.data import extract_batch_size

__all__ = ["KasminaCallback", "replay_validation"]


class KasminaCallback(pl.Callback):
    """`monitor`: a key the module logs in validation; `mode`: "max" or "min" (it sets the
    direction of `config`, default ControllerConfig()). `evaluate`: returns `monitor` for the
    model as it is now (default: the replayed validation). The controller is built at fit
    start (`self.controller`) and its state is kept in Lightning checkpoints."""

    def __init__(self, monitor: str, mode: str, config: ControllerConfig | None = None,
                 evaluate: Callable[[], float] | None = None) -> None:
        self.monitor = monitor
        self.config = with_mode(config, mode)
        self.evaluate = evaluate
        self.controller: LocalController | None = None
        self._restored: dict[str, Any] = {}  # from a checkpoint, before the controller exists
        self._losses: list[torch.Tensor] = []  # this optimizer step's micro-batches
        self._stepped_at = 0  # trainer.global_step at the last controller.step
        self._judged_at = 0  # trainer.global_step at the last end_epoch

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if blueprint_parameters_in(trainer.optimizers, pl_module):
            raise ValueError("KasminaCallback: the optimizer from configure_optimizers holds "
                             "blueprint parameters; build it over kasmina.host_parameters(self) "
                             "(the seeds' own optimizer steps the blueprints)")
        self.controller = LocalController(pl_module, self.config)
        if self._restored:
            self.controller.load_state_dict(self._restored)
        self._losses.clear()
        self._stepped_at = self._judged_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss)
        if self.controller is None or trainer.global_step == self._stepped_at:
            return  # accumulating gradients: no optimizer step yet
        self._stepped_at = trainer.global_step
        loss, self._losses = step_loss(self._losses), []
        # Lightning's 16-mixed scaler has already updated inside optimizer.step: on a growth
        # step the seeds' unscale is off by the growth factor for that one step; an overflow
        # step's infinite gradients skip the seeds' step, as the scaler skipped the host's.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None:
            self.controller.step(loss)
        else:
            self.controller.step(loss, scaler)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.controller is None or trainer.sanity_checking
                or trainer.state.fn != TrainerFn.FITTING
                or trainer.global_step == self._judged_at):  # no optimizer step since the last
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            raise RuntimeError(f"KasminaCallback: validation logged no {self.monitor!r} (it "
                               f"logged {sorted(trainer.callback_metrics)}): self.log it in "
                               "validation_step")
        self._judged_at = trainer.global_step
        evaluate = self.evaluate or (lambda: replay_validation(trainer, pl_module, self.monitor))
        self.controller.end_epoch(float(metric), evaluate=evaluate)

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict() if self.controller is not None else self._restored

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        if self.controller is not None and self._restored:
            self.controller.load_state_dict(self._restored)


def replay_validation(trainer: pl.Trainer, pl_module: pl.LightningModule, monitor: str) -> float:
    """`monitor` from one more pass of the module's own validation, as the trainer's validation
    loop runs it (same dataloaders, batch limits, batch transfer and precision), without the
    loop: nothing is logged, no callback runs. Modes are restored afterwards."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, list | tuple):
        loaders = [loaders]
    several = len(loaders) > 1
    record = _MonitorRecord(monitor)
    pass_batch_idx = _takes_batch_idx(pl_module.validation_step)
    modes = [(m, m.training) for m in pl_module.modules()]
    pl_module.log = record.log  # shadows LightningModule.log; log_dict calls it too
    try:
        pl_module.on_validation_model_eval()
        with torch.no_grad():
            pl_module.on_validation_epoch_start()
            for idx, (loader, limit) in enumerate(zip(loaders, trainer.num_val_batches,
                                                      strict=True)):
                record.suffix = f"/dataloader_idx_{idx}" if several else ""
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= limit:
                        break
                    batch = trainer.precision_plugin.convert_input(batch)
                    # the loop's own call: the hook may live on the LightningDataModule
                    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=idx)
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
                    record.batch = batch
                    args = (batch, batch_idx) if pass_batch_idx else (batch,)
                    trainer.strategy.validation_step(*args, *((idx,) if several else ()))
            record.suffix, record.batch = "", None
            pl_module.on_validation_epoch_end()
    finally:
        del pl_module.log
        for m, training in modes:
            m.training = training
    return record.value()


def _takes_batch_idx(step: Callable[..., Any]) -> bool:
    params = inspect.signature(step).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


_LOG = inspect.signature(pl.LightningModule.log)
# reduce_fx spellings Lightning accepts for each reduction it knows
_MEAN = ("mean", torch.mean)
_SUM = ("sum", torch.sum, sum)
_MAX = ("max", torch.max, max)
_MIN = ("min", torch.min, min)


class _MonitorRecord:
    """Stands in for `LightningModule.log` during a replay: keeps what is logged under the
    monitored name (with Lightning's `/dataloader_idx_N` and `_epoch` spellings) and reduces it
    over the replay as Lightning's result collection does at the epoch's end."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.suffix = ""  # "/dataloader_idx_N" with several val dataloaders
        self.batch: Any = None  # the current batch, for the inferred batch size
        self.values: list[tuple[torch.Tensor, int]] = []
        self.reduce_fx: Any = "mean"
        self.metric: Any = None  # a torchmetrics Metric logged as the value

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        call = _LOG.bind(None, name, value, *args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        suffix = self.suffix if a["add_dataloader_idx"] else ""
        forked = a["on_step"] and a["on_epoch"] is not False
        if self.monitor not in {name + suffix, f"{name}_epoch{suffix}" if forked else None}:
            return
        if callable(getattr(value, "compute", None)) and callable(getattr(value, "reset", None)):
            self.metric = value
            return
        size = a["batch_size"]
        if size is None:
            size = 1 if self.batch is None else extract_batch_size(self.batch)
        self.reduce_fx = a["reduce_fx"]
        self.values.append((torch.as_tensor(value).detach().double().reshape(()), size))

    def value(self) -> float:
        if self.metric is not None:
            result = float(self.metric.compute())
            self.metric.reset()  # the next real validation starts from an empty state
            return result
        if not self.values:
            raise RuntimeError(f"KasminaCallback: the replayed validation logged no "
                               f"{self.monitor!r}; pass KasminaCallback(evaluate=...)")
        values = torch.stack([v for v, _ in self.values])
        sizes = torch.tensor([s for _, s in self.values], dtype=torch.float64,
                             device=values.device)
        fx = self.reduce_fx
        if fx in _MEAN:
            return float((values * sizes).sum() / sizes.sum())
        if fx in _SUM:
            return float(values.sum())
        if fx in _MAX:
            return float(values.max())
        if fx in _MIN:
            return float(values.min())
        raise ValueError(f"KasminaCallback: cannot replay reduce_fx={fx!r} for "
                         f"{self.monitor!r}; pass KasminaCallback(evaluate=...)")
