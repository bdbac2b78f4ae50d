"""`KasminaTrainerCallback`: a Hugging Face `Trainer` grows seed layers with the LocalController.

    model = kasmina.wrap(BertForSequenceClassification(config), seeds_per_layer=8,
                         exclude=("classifier",))
    trainer = Trainer(model, TrainingArguments(..., eval_strategy="epoch"),
                      train_dataset=train, eval_dataset=val)
    trainer.add_callback(KasminaTrainerCallback(trainer))
    trainer.train()

The callback is given the trainer (a TrainerCallback is not) for three things:
- The optimizer the Trainer builds (any `optim`, its weight-decay groups, or one passed as
  `optimizers=(opt, None)`) holds host parameters only: `trainer.create_optimizer` is wrapped
  to drop blueprint parameters from it as it is made, before its first step and before a
  checkpoint's optimizer state is loaded into it, so `resume_from_checkpoint` matches. (The
  Trainer's default would step the blueprints a second time with the host's optimizer.)
- The step's loss: `trainer.training_step` is wrapped to keep its return values, summed over
  the micro-batches of a step as the Trainer logs them. `controller.step(loss)` runs in
  `on_optimizer_step`: `on_step_end` comes after the Trainer's `model.zero_grad()`, which
  would wipe the blueprint gradients the seeds' step reads.
- The counterfactuals: at each evaluation during training (`on_evaluate`, once an optimizer
  step has come since the last), `controller.end_epoch(metrics[monitor], evaluate=...)` where
  `evaluate` runs `trainer.evaluation_loop` on the same eval set: `trainer.evaluate()` without
  its logging and its `on_evaluate` callbacks (an EarlyStoppingCallback must not count the
  counterfactual passes).

`monitor` and `mode` default to the TrainingArguments' `metric_for_best_model` and
`greater_is_better` (HF's own rule), else "eval_loss" and "min". One process, as for the
LocalController.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..controller import ControllerConfig, LocalController
from ..extras import requires_extras
from .common import blueprint_parameter_ids, blueprint_parameters_in, step_loss, with_mode

with requires_extras("kasmina.integrations.hf", "hf"):
    import transformers

__all__ = ["KasminaTrainerCallback"]


class KasminaTrainerCallback(transformers.TrainerCallback):
    """`trainer.add_callback(KasminaTrainerCallback(trainer))`. `config` (default
    ControllerConfig()) gets the direction `mode`; `evaluate` returns `monitor` for the model as
    it is now (default: the Trainer's evaluation loop). The controller is built at train begin
    (`self.controller`)."""

    def __init__(self, trainer: transformers.Trainer, config: ControllerConfig | None = None,
                 monitor: str | None = None, mode: str | None = None,
                 evaluate: Callable[[], float] | None = None) -> None:
        args = trainer.args
        self.trainer = trainer
        self.monitor = _eval_key(monitor or args.metric_for_best_model or "loss")
        self.config = with_mode(config, mode or _mode_of(args, self.monitor))
        self.evaluate = evaluate
        self.controller: LocalController | None = None
        self._model: torch.nn.Module | None = None  # the controller's (model_init makes anew)
        self._losses: list[torch.Tensor] = []  # this optimizer step's micro-batches
        self._training = False  # between on_train_begin and on_train_end
        self._judging = False  # inside end_epoch: an evaluate() that calls trainer.evaluate()
        self._judged_at = 0  # state.global_step at the last end_epoch
        self._instrument(trainer)

    def _instrument(self, trainer: transformers.Trainer) -> None:
        create_optimizer, training_step = trainer.create_optimizer, trainer.training_step

        def create_host_optimizer(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
            optimizer = create_optimizer(*args, **kwargs)
            _drop_parameters(optimizer, blueprint_parameter_ids(trainer.model))
            return optimizer

        def training_step_kept(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = training_step(*args, **kwargs)
            self._losses.append(loss)
            return loss

        trainer.create_optimizer = create_host_optimizer
        trainer.training_step = training_step_kept

    def on_train_begin(self, args: transformers.TrainingArguments,
                       state: transformers.TrainerState, control: transformers.TrainerControl,
                       model: torch.nn.Module | None = None,
                       optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        assert model is not None
        if optimizer is not None and blueprint_parameters_in([optimizer], model):
            raise RuntimeError("KasminaTrainerCallback: the Trainer's optimizer holds blueprint "
                               "parameters (it was not made by trainer.create_optimizer); build "
                               "it over kasmina.host_parameters(model)")
        if self._model is not model:
            self.controller, self._model = LocalController(model, self.config), model
        self._training, self._judged_at = True, state.global_step
        self._losses.clear()

    def on_train_end(self, args: transformers.TrainingArguments,
                     state: transformers.TrainerState, control: transformers.TrainerControl,
                     **kwargs: Any) -> None:
        self._training = False

    def on_optimizer_step(self, args: transformers.TrainingArguments,
                          state: transformers.TrainerState,
                          control: transformers.TrainerControl, **kwargs: Any) -> None:
        if self.controller is None:
            return
        loss, self._losses = step_loss(self._losses), []
        # accelerate's fp16 scaler has already updated inside optimizer.step: on a growth step
        # the seeds' unscale is off by the growth factor for that one step; an overflow step's
        # infinite gradients skip the seeds' step, as the scaler skipped the host's.
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is None:
            self.controller.step(loss)
        else:
            self.controller.step(loss, scaler)

    def on_evaluate(self, args: transformers.TrainingArguments,
                    state: transformers.TrainerState, control: transformers.TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if (self.controller is None or not self._training or self._judging
                or state.global_step == self._judged_at):  # no optimizer step since the last
            return
        metrics = metrics or {}
        if self.monitor not in metrics:
            if isinstance(self.trainer.eval_dataset, dict):
                return  # the pass over another of several eval sets
            raise RuntimeError(f"KasminaTrainerCallback: evaluation gave no {self.monitor!r} "
                               f"(it gave {sorted(metrics)}): set monitor= or "
                               "metric_for_best_model")
        self._judged_at = state.global_step
        self._judging = True
        try:
            self.controller.end_epoch(float(metrics[self.monitor]),
                                      evaluate=self.evaluate or self._evaluate_again)
        finally:
            self._judging = False

    def _evaluate_again(self) -> float:
        trainer = self.trainer
        name, prefix = self._eval_set()
        output = trainer.evaluation_loop(
            trainer.get_eval_dataloader(name), description="Kasmina counterfactual",
            # as trainer.evaluate(): no predictions gathered without compute_metrics
            prediction_loss_only=True if trainer.compute_metrics is None else None,
            metric_key_prefix=prefix)
        return float(output.metrics[self.monitor])

    def _eval_set(self) -> tuple[str | None, str]:
        """The eval set `monitor` is measured on and the metric prefix the Trainer gives it."""
        sets = self.trainer.eval_dataset
        if not isinstance(sets, dict):
            return None, "eval"
        names = [n for n in sets if self.monitor.startswith(f"eval_{n}_")]
        if not names:
            raise RuntimeError(f"KasminaTrainerCallback: {self.monitor!r} names none of the "
                               f"eval sets {sorted(sets)} (eval_<set>_<metric>)")
        name = max(names, key=len)
        return name, f"eval_{name}"


def _eval_key(metric: str) -> str:
    """The Trainer's spelling of a metric in evaluation results (as for metric_for_best_model)."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _mode_of(args: transformers.TrainingArguments, monitor: str) -> str:
    best = args.metric_for_best_model
    if best is not None and _eval_key(best) == monitor and args.greater_is_better is not None:
        return "max" if args.greater_is_better else "min"
    return "min" if monitor.endswith("loss") else "max"


def _drop_parameters(optimizer: torch.optim.Optimizer, ids: set[int]) -> None:
    """Remove the parameters `ids` (and any state of theirs) from the optimizer's groups."""
    if not ids:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in ids:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) not in ids]
