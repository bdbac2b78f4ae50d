"""The host CPU time a dormant seed layer adds to a training step, on the CPU at a tiny shape
(the compute is negligible: what is left is Python and dispatch): the bare nn.Linear's step,
the seed layer's with telemetry every 10th step, and with none.

    python3 benchmarks/probe_dormant_cpu.py [--steps 3000]
"""

from __future__ import annotations

import argparse
import time

import torch
from kasmina import KasminaConfig, KasminaLayer
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, g = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8)
    cases = {"bare": nn.Linear(8, 8)}
    for name, every in (("dormant10", 10), ("dormant, no telemetry", 10**9)):
        cases[name] = KasminaLayer(nn.Linear(8, 8), 4, KasminaConfig(telemetry_every=every))
    for _ in range(2):  # the second pass is the one to read
        for name, model in cases.items():
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            after = getattr(model, "step", lambda: None)
            t0 = 0.0
            for i in range(200 + args.steps):
                if i == 200:
                    t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                x.grad = None
                model(x).backward(g)
                opt.step()
                after()
            print(f"{name:<22} {(time.perf_counter() - t0) / args.steps * 1e6:7.1f} us a step")


if __name__ == "__main__":
    main()
