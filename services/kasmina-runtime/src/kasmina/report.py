"""`runs/<name>/report.md` and its plots for a fleet run: accuracy and loss per epoch with
lifecycle commands marked, and a seed-stage timeline per layer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .lifecycle import SeedStage  # noqa: E402

_STAGE_COLOURS = plt.get_cmap("tab20")(np.linspace(0, 1, len(SeedStage)))


def plot_training(runs: dict[str, dict], out: Path) -> None:
    """runs: name -> {"epochs": [{"epoch", "train_loss", "val_loss"}], "events": [(epoch, text)]}"""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, run in runs.items():
        epochs = [e["epoch"] for e in run["epochs"]]
        axes[0].plot(epochs, [e["train_loss"] for e in run["epochs"]], label=name)
        axes[1].plot(epochs, [e["val_loss"] for e in run["epochs"]], label=name)
        for epoch, _ in run.get("events", []):
            axes[1].axvline(epoch, color="grey", alpha=0.15, linewidth=1)
    axes[0].set(title="training loss", xlabel="epoch", yscale="log")
    axes[1].set(title="validation loss (grey: lifecycle commands applied)", xlabel="epoch",
                yscale="log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_stage_timeline(stages: dict[str, np.ndarray], out: Path) -> None:
    """stages: layer id -> (epochs, seeds) array of Python SeedStage values."""
    fig, axes = plt.subplots(len(stages), 1, figsize=(10, 1.2 + 1.0 * len(stages)),
                             squeeze=False)
    for ax, (layer, grid) in zip(axes[:, 0], stages.items(), strict=True):
        ax.imshow(_STAGE_COLOURS[grid.T], aspect="auto", interpolation="nearest",
                  extent=(0.5, grid.shape[0] + 0.5, grid.shape[1] - 0.5, -0.5))
        ax.set(title=f"layer {layer}: seed stages per epoch", xlabel="epoch", ylabel="seed")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_STAGE_COLOURS[s]) for s in SeedStage]
    fig.legend(handles, [s.name for s in SeedStage], loc="lower center", ncol=6, fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(path: Path, summary_text: str, plots: list[str]) -> None:
    lines = ["# Kasmina fleet run", "", "```", summary_text.strip(), "```", ""]
    lines += [f"![{p}]({p})" for p in plots]
    path.write_text("\n".join(lines) + "\n")
