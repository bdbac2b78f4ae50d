"""The library without its extras, and the Lightning and Hugging Face callbacks with the real
libraries (tiny random-weight models, CPU, no downloads).

Lightning and transformers are imported inside the tests, never at collection: importing
lightning loads triton (through torch._dynamo) before test_kernels sets TRITON_INTERPRET, and
transformers, whose Conv1D kasmina.wrap targets once it is loaded, into every other test."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import kasmina
import numpy as np
import pytest
import torch
from kasmina import ControllerConfig, KasminaConfig, LocalController, SeedStage
from kasmina.extras import EXTRAS
from packaging.requirements import Requirement
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRA_MODULES = sorted({m for modules in EXTRAS.values() for m in modules}
                       | {"pytorch_lightning", "torchmetrics", "scipy"})

# The library's whole life in a training loop: wrap, a seed through germination and training,
# the controller's boundaries, a checkpoint round trip.
CORE_WORKLOAD = textwrap.dedent("""
    import torch
    from torch import nn
    import kasmina
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model (see _one_thread)
    def mlp():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    model = kasmina.wrap(mlp(), seeds_per_layer=4, exclude=("2",),
                         config=kasmina.KasminaConfig(min_training_steps=1,
                                                      reconstruction_threshold=1e9))
    kasmina.seed_layers(model)[0].germinate(0, "residual_mlp", "fixed_ramp")
    ctl = kasmina.LocalController(model, kasmina.ControllerConfig(plateau_epochs=1))
    opt = torch.optim.Adam(kasmina.host_parameters(model))
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for epoch in range(3):
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); ctl.step(loss.detach())
        ctl.end_epoch(0.5, evaluate=lambda: 0.5)
    assert any(e.from_stage == kasmina.SeedStage.TRAINING for e in ctl.events), ctl.events
    kasmina.wrap(mlp(), seeds_per_layer=4, exclude=("2",)).load_state_dict(model.state_dict())
""")

# Then, on the same machine, what each entry point that needs an extra says without it.
MISSING_EXTRAS = textwrap.dedent("""
    import contextlib, io, json, runpy, sys
    from kasmina.extras import MissingExtraError
    said = {}
    for name, code in [("attach", "kasmina.attach"),
                       ("lightning", "import kasmina.integrations.lightning"),
                       ("hf", "import kasmina.integrations.hf")]:
        try:
            exec(code)
        except MissingExtraError as e:
            said[name] = str(e)
    for command in ("demo", "fleet", "serve", "submit"):
        sys.argv, stderr = ["kasmina", command], io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                runpy.run_module("kasmina", run_name="__main__", alter_sys=True)
            except SystemExit as e:  # sys.exit(message): status 1, the message on stderr
                said[command] = [e.code if isinstance(e.code, int) else 1, str(e.code)]
    print(json.dumps(said))
""")


def _distributions(*names: str) -> list[importlib.metadata.Distribution]:
    """The distributions `names` need to run, by their metadata (no extras)."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


@pytest.fixture(scope="module")
def torch_and_numpy_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that holds kasmina, torch and numpy (and what those two need) and nothing else:
    `python -S` with it as PYTHONPATH is a machine where the library alone is installed."""
    root = tmp_path_factory.mktemp("torch-and-numpy")
    for dist in _distributions("torch", "numpy"):
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not (root / top).exists():
                (root / top).symlink_to(dist.locate_file(top))
    (root / "kasmina").symlink_to(Path(kasmina.__file__).parent)
    return root


def _python(code: str, path: Path | None = None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter: this environment's, or with only `path` (python -S)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = [sys.executable, "-c", code]
    if path is not None:
        env["PYTHONPATH"] = str(path)
        argv.insert(1, "-S")  # no site-packages: only what `path` holds
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    return done


def test_the_core_needs_only_torch_and_numpy(torch_and_numpy_only: Path) -> None:
    done = _python(CORE_WORKLOAD + "import sys; print(sorted(set(sys.modules) & "
                   f"set({EXTRA_MODULES!r})))\n" + MISSING_EXTRAS, torch_and_numpy_only)
    loaded, said = done.stdout.splitlines()
    assert loaded == "[]"
    said = json.loads(said)
    assert said.pop("attach").startswith(
        "kasmina.attach needs the fleet extra: pip install 'kasmina-runtime[fleet]' "
        "(no module named ")
    assert said.pop("lightning") == (
        "kasmina.integrations.lightning needs the lightning extra: "
        "pip install 'kasmina-runtime[lightning]' (no module named 'lightning')")
    assert said.pop("hf") == ("kasmina.integrations.hf needs the hf extra: "
                              "pip install 'kasmina-runtime[hf]' (no module named 'transformers')")
    for command, needs in (("demo", "the demo extra: pip install 'kasmina-runtime[demo]'"),
                           ("fleet", "the fleet and demo extras: "
                                     "pip install 'kasmina-runtime[fleet,demo]'"),
                           ("serve", "the fleet and demo extras: "
                                     "pip install 'kasmina-runtime[fleet,demo]'"),
                           ("submit", "the fleet extra: pip install 'kasmina-runtime[fleet]'")):
        status, message = said.pop(command)
        assert status == 1, command
        expected = f"python -m kasmina {command} needs {needs} (no module named "
        assert message.startswith(expected), message
    assert not said


def test_the_core_loads_nothing_of_the_extras_torch_does_not() -> None:
    """With every extra installed, the library loads none of their modules beyond those torch
    loads by itself when they are there (torch.hub imports tqdm, torch._dynamo triton)."""
    code = textwrap.dedent(f"""
        import sys
        import torch
        watched = set({EXTRA_MODULES!r})
        p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.ones(2)
        torch.optim.Adam([p]).step()
        by_torch = watched & set(sys.modules)
    """) + CORE_WORKLOAD + "print(sorted(watched & set(sys.modules) - by_torch))\n"
    assert _python(code).stdout.strip() == "[]"


def test_the_distribution_needs_torch_and_numpy_and_offers_the_extras() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    needs = [Requirement(r) for r in project["dependencies"]]
    assert [r.name for r in needs] == ["torch", "numpy"]
    # a range the pinned CPU build satisfies: installing the library never replaces torch
    assert needs[0].specifier.contains(torch.__version__.split("+")[0])
    extras = project["optional-dependencies"]
    assert set(extras) == set(EXTRAS) | {"all"}
    assert extras["all"] == [f"kasmina-runtime[{','.join(EXTRAS)}]"]
    assert not any(Requirement(r).name == "torch" for r in sum(extras.values(), []))


# ---------------------------------------------------------------- the callbacks, shared


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two, and far faster when the
    two cores are shared (a 2-layer seeded step, measured: 2.4 ms on one, 114 ms on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_lifecycle() -> KasminaConfig:
    """A lifecycle that moves within a few epochs: every gate passes at its first chance."""
    return KasminaConfig(min_training_steps=1, reconstruction_threshold=1e9, ramp_steps=1,
                         stabilization_epochs=1, evaluation_epochs=1, fine_tuning_epochs=1,
                         evaluation_min_gain=-1e9, fossilize_min_gain=-1e9)


# plateau_epochs=1 and a min_delta no change beats: a plateau at every boundary after the first
PLATEAU = ControllerConfig(plateau_epochs=1, min_delta=1e9)


class _Calls:
    """Counts LocalController.step and end_epoch, keeps every boundary's health reports, and
    checks end_epoch's contract: evaluate() with no seed switched off gives back val_metric."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps, self.boundaries, self.controllers, self.reports = 0, 0, [], []
        self.losses: list[float] = []  # the loss each step reported
        step, end_epoch = LocalController.step, LocalController.end_epoch

        def counted_step(ctl: LocalController, loss=None, *args: object, **kwargs: object
                         ) -> None:
            self.steps += 1
            self.losses.append(float(loss))
            step(ctl, loss, *args, **kwargs)

        def checked_end_epoch(ctl: LocalController, val_metric: float, evaluate=None):
            assert evaluate is not None
            assert evaluate() == pytest.approx(val_metric, rel=1e-5, abs=1e-6)
            self.boundaries += 1
            if ctl not in self.controllers:
                self.controllers.append(ctl)
            events = end_epoch(ctl, val_metric, evaluate)
            self.reports.extend(ctl.reports)
            return events

        monkeypatch.setattr(LocalController, "step", counted_step)
        monkeypatch.setattr(LocalController, "end_epoch", checked_end_epoch)


def _assert_seeds_grew(ctl: LocalController, calls: _Calls) -> None:
    moves = {(e.from_stage, e.to_stage) for e in ctl.events}
    assert (SeedStage.DORMANT, SeedStage.GERMINATED) in moves, ctl.events
    assert (SeedStage.TRAINING, SeedStage.GRAFTING) in moves, ctl.events
    assert (SeedStage.STABILIZATION, SeedStage.EVALUATING) in moves, ctl.events
    # the seeds' own optimizer saw blueprint gradients (stepped before anything zeroed them)
    assert max(np.nanmax(r.grad_norm, initial=0.0) for r in calls.reports) > 0
    # and an evaluating seed was judged by a counterfactual pass of evaluate()
    assert any(np.isfinite(r.contribution).any() for r in calls.reports)


# ---------------------------------------------------------------- Lightning


@functools.cache
def _lightning() -> SimpleNamespace:
    """lightning.pytorch, the callback, and this file's LightningModule and probe."""
    import lightning.pytorch as pl
    from kasmina.integrations.lightning import KasminaCallback, replay_validation

    class Net(pl.LightningModule):
        def __init__(self, host_only: bool = True) -> None:
            super().__init__()
            self.net = kasmina.wrap(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3)),
                                    seeds_per_layer=4, exclude=("2",), config=_tiny_lifecycle())
            self.host_only = host_only
            self.losses: list[float] = []  # every training batch's

        def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int
                          ) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
            x, y = batch
            logits = self.net(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean(), reduce_fx="max")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            params = kasmina.host_parameters(self) if self.host_only else self.parameters()
            return torch.optim.Adam(params, lr=1e-2)

    class ReplayProbe(pl.Callback):
        """Before KasminaCallback: the replay of the validation that just ran gives what it
        logged, for a mean over uneven batches and for reduce_fx="max"."""

        def __init__(self) -> None:
            self.compared = 0

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            for key in ("val_loss", "val_acc"):
                replayed = replay_validation(trainer, pl_module, key)
                assert replayed == pytest.approx(float(trainer.callback_metrics[key]), rel=1e-5)
            self.compared += 1

    return SimpleNamespace(pl=pl, KasminaCallback=KasminaCallback, Net=Net,
                           ReplayProbe=ReplayProbe)


def _loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(72, 8, generator=g), torch.randint(0, 3, (72,), generator=g)
    # 22 validation rows in batches of 8: the last batch (6) weighs less in the epoch's mean
    return (DataLoader(TensorDataset(x[:50], y[:50]), batch_size=10),
            DataLoader(TensorDataset(x[50:], y[50:]), batch_size=8))


def _trainer(callbacks: list, epochs: int):
    return _lightning().pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=2, num_sanity_val_steps=1)


# Lightning 2.6 on torch 2.13: its CombinedLoader builds a torch pytree LeafSpec, deprecated
LIGHTNING_ON_NEW_TORCH = r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"


@pytest.mark.filterwarnings(
    LIGHTNING_ON_NEW_TORCH,
    # Lightning's advice about DataLoader workers, meaningless for in-memory tensors on CPU
    "ignore:The '(train|val)_dataloader' does not have many workers:UserWarning",
    # and about the few batches of this tiny run
    "ignore:The number of training batches:UserWarning")
def test_lightning_callback_drives_the_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    calls = _Calls(monkeypatch)
    lightning = _lightning()
    callback = lightning.KasminaCallback(monitor="val_loss", mode="min", config=PLATEAU)
    probe = lightning.ReplayProbe()
    trainer = _trainer([probe, callback], epochs=6)
    train, val = _loaders()
    module = lightning.Net()
    trainer.fit(module, train, val)
    # 5 batches an epoch, 2 per optimizer step (the odd last one steps too): 3 steps an epoch
    assert trainer.global_step == 18
    assert calls.steps == trainer.global_step
    # a step's loss: its batches' losses, each divided by accumulate_grad_batches as Lightning
    # divides them (the last, lone batch of an epoch too)
    per_epoch = [module.losses[i:i + 5] for i in range(0, 30, 5)]
    expected = [sum(e[a:b]) / 2 for e in per_epoch for a, b in ((0, 2), (2, 4), (4, 5))]
    assert calls.losses == pytest.approx(expected, rel=1e-6)
    assert calls.boundaries == 6 and probe.compared == 6  # not the sanity check
    assert calls.controllers == [callback.controller]
    assert callback.controller.config.mode == "min"
    _assert_seeds_grew(callback.controller, calls)
    assert callback.state_dict() == callback.controller.state_dict()


@pytest.mark.filterwarnings(LIGHTNING_ON_NEW_TORCH)
def test_lightning_callback_refuses_an_optimizer_over_blueprints() -> None:
    lightning = _lightning()
    module = lightning.Net(host_only=False)
    kasmina.seed_layers(module)[0].germinate(0, "residual_mlp", "fixed_ramp")  # a bank exists
    train, val = _loaders()
    callback = lightning.KasminaCallback(monitor="val_loss", mode="min")
    with pytest.raises(ValueError, match=r"kasmina\.host_parameters\(self\)"):
        _trainer([callback], epochs=1).fit(module, train, val)


# ---------------------------------------------------------------- Hugging Face


class _Sequences(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()  # learnable from the first token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.labels[i]}


def _bert() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=2)
    return kasmina.wrap(transformers.BertForSequenceClassification(config), seeds_per_layer=2,
                        exclude=("classifier",), config=_tiny_lifecycle())


def _hf_trainer(model: nn.Module, out: Path, epochs: int,
                optimizer: torch.optim.Optimizer | None = None):
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, gradient_accumulation_steps=2, learning_rate=1e-3,
        eval_strategy="epoch", save_strategy="no", logging_steps=1, report_to="none",
        disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_Sequences(40, 1),
                                eval_dataset=_Sequences(20, 2), optimizers=(optimizer, None))


def test_hf_callback_drives_the_controller(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    from kasmina.integrations.hf import KasminaTrainerCallback

    calls = _Calls(monkeypatch)
    trainer = _hf_trainer(_bert(), tmp_path, epochs=6)
    callback = KasminaTrainerCallback(trainer, config=PLATEAU)
    trainer.add_callback(callback)
    trainer.train()
    # 5 batches an epoch, 2 per optimizer step (the odd last one steps too): 3 steps an epoch
    assert trainer.state.global_step == 18
    assert calls.steps == trainer.state.global_step
    # each step's loss is the one the Trainer logs for that step
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert calls.losses == pytest.approx(logged, abs=1e-4)
    assert calls.boundaries == 6
    assert calls.controllers == [callback.controller]
    assert callback.monitor == "eval_loss" and callback.controller.config.mode == "min"
    _assert_seeds_grew(callback.controller, calls)
    trainer.evaluate()  # after training: no boundary
    assert calls.boundaries == 6


@pytest.mark.parametrize("passed", [False, True], ids=["built", "passed"])
def test_hf_trainer_optimizer_leaves_blueprints_to_the_seeds(tmp_path: Path, passed: bool
                                                            ) -> None:
    """The optimizer the Trainer builds, or one passed over all the model's parameters."""
    from kasmina.integrations.hf import KasminaTrainerCallback

    model = _bert()
    layer = kasmina.seed_layers(model)[0]
    layer.germinate(0, "residual_mlp", "fixed_ramp")  # a bank exists before the optimizer
    own = torch.optim.AdamW(model.parameters()) if passed else None
    trainer = _hf_trainer(model, tmp_path, epochs=1, optimizer=own)
    trainer.add_callback(KasminaTrainerCallback(trainer))
    optimizer = trainer.create_optimizer()
    assert optimizer is own or not passed
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in kasmina.host_parameters(model)}
    assert any(id(p) not in held for p in layer.parameters())
