"""The fused residual_mlp kernels (kasmina/kernels/triton_mlp.py) alone: forward and backward
GPU time (CUDA events, median of 20) and the largest error against float64, at the bars' shapes
(102 running slots of 4 features at 32,768 and 8,192 rows; 64-seed layers: 16 features), and
at a wrapped model's (bench_model.py: 51 slots of 12 and 16 features at 8,192 rows) and the
wide banks' (64 seeds: 6 slots of 32 and 64 features at 32,768 rows). From 9 features the
tiles (triton_mlp_wide) run; at 12 and 16 the unrolled columns are timed too ("columns").
results/probe_mlp_h200_2026-12-01.log is this probe over a `tl.dot` form's choices (input
precision, rows a block, warps, backward programs), since replaced (see triton_mlp.py).

    python3 benchmarks/probe_mlp.py
"""

from __future__ import annotations

import argparse
import statistics

import torch
from kasmina.bank import BlueprintBank
from kasmina.blueprints import BlueprintSpec
from kasmina.kernels import ops, triton_mlp


def timed(fn, reps: int = 20) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    cases = ((102, 32768, 4), (102, 8192, 4), (7, 32768, 16), (51, 8192, 12), (51, 8192, 16),
             (6, 32768, 32), (6, 32768, 64))
    for (slots, rows, chunk), form in ((c, f) for c in cases for f in (
            ("tiles", "columns") if 9 <= c[2] <= 16 else ("",))):
        bank = BlueprintBank(BlueprintSpec("t", "residual_mlp", 1, hidden=16), chunk, slots, dev)
        for s in range(slots):
            bank.init_slot(s, s)
        x = torch.randn(slots, rows, chunk, device=dev)
        dy = torch.randn_like(x)
        xd = x.double().requires_grad_()
        params = {k: v.detach().double().requires_grad_() for k, v in bank.params.items()}
        z = torch.nn.functional.gelu(torch.baddbmm(params["b1"].unsqueeze(1), xd, params["w1"]))
        y64 = xd + torch.baddbmm(params["b2"].unsqueeze(1), z, params["w2"])
        dx64, *dp64 = torch.autograd.grad(y64, (xd, *params.values()), dy.double())
        dflat64 = torch.cat([g.flatten(1) for g in dp64], 1)
        triton_mlp.wide_mlp = (lambda *_: False) if form == "columns" else ops.wide_mlp
        triton_mlp._form.cache_clear()  # (it caches the form a bank's sizes take)
        print(f"== {slots} slots x {rows} rows x {chunk} features (hidden 16) {form}")
        y = triton_mlp.forward(x, bank.flat.detach(), 16)
        dx, dflat = triton_mlp.backward(x, bank.flat.detach(), dy, 16, True)
        err = max((y - y64).abs().max().item(), (dx - dx64).abs().max().item(),
                  ((dflat - dflat64).abs().max() / dflat64.abs().max()).item())
        flat = bank.flat.detach()
        fwd = timed(lambda x=x, flat=flat: triton_mlp.forward(x, flat, 16))
        bwd = timed(lambda x=x, flat=flat, dy=dy: triton_mlp.backward(x, flat, dy, 16, False))
        bwd_dx = timed(lambda x=x, flat=flat, dy=dy: triton_mlp.backward(x, flat, dy, 16, True))
        print(f"fwd {fwd:7.1f} us  bwd {bwd:7.1f} us  bwd+dx {bwd_dx:7.1f} us  err {err:.1e}",
              flush=True)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    main()
