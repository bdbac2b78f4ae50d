"""Growth in your own training loop: the lines marked `# kasmina` are all it takes.

    .venv/bin/python examples/grow_mlp.py --epochs 40
"""

from __future__ import annotations

import argparse

import kasmina
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F


def main(epochs: int = 40) -> list[kasmina.LifecycleEvent]:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    x_tr, y_tr, x_va, y_va = x[:1400], y[:1400], x[1400:], y[1400:]

    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    kasmina.wrap(model, seeds_per_layer=4, exclude=("2",),  # kasmina
                 config=kasmina.KasminaConfig(mode="max"))
    controller = kasmina.LocalController(model)  # kasmina
    optimizer = torch.optim.Adam(kasmina.host_parameters(model), lr=3e-3)  # kasmina

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            return (model(x_va).argmax(1) == y_va).float().mean().item()

    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_tr)).split(64):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            controller.step(loss.detach())  # kasmina
        acc = accuracy()
        for event in controller.end_epoch(acc, evaluate=accuracy):  # kasmina
            print(f"epoch {epoch + 1}: {event.layer_id}[{event.seed_id}] "
                  f"{event.from_stage.name} -> {event.to_stage.name} ({event.reason})")
    print(f"validation accuracy {accuracy():.4f}; blueprint parameters added: "
          f"{sum(layer.params_added() for layer in kasmina.seed_layers(model))}")
    return controller.events


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    main(parser.parse_args().epochs)
