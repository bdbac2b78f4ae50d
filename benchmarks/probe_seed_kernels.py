"""The fused node's seed kernels (kernels/triton_mlp.py `seed_forward`, with its finishing
launch, and `seed_backward`) alone at the bars' growing case, over row blocks, warps and
programs, groups of hidden units and the chunks' alignment, each checked first against a
float64 formula. CUDA only.

    python3 benchmarks/probe_seed_kernels.py [--shape 4096x32768] [--seeds 1024] [--lanes 102]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F  # noqa: N812
from kasmina.kernels import triton_mlp as tm

FWD = [(64, 1, 1), (64, 1, 4), (128, 2, 4), (32, 1, 4), (128, 1, 4)]  # (rows, warps, align)
BWD = [(4, 32, 1, 16384, 1), (4, 32, 1, 16384, 4), (4, 32, 1, 8192, 4), (4, 64, 2, 8192, 4),
       (8, 32, 1, 16384, 4)]
# (hidden units a group, rows, warps, programs, align)


def timed(fn, reps: int = 20) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    ts = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    for i in range(reps):
        ts[i].record()
        fn()
    ts[-1].record()
    torch.cuda.synchronize()
    return sorted(ts[i].elapsed_time(ts[i + 1]) for i in range(reps))[reps // 2] * 1e3


def reference(h: torch.Tensor, flat: torch.Tensor, starts: torch.Tensor, c: int, hid: int,
              a: float, g: torch.Tensor, coef: float) -> tuple:
    """float64 (blended chunks (A, N, C), d flat) of the residual_mlp blueprint."""
    idx = starts[:, None].long() + torch.arange(c, device=h.device)
    x = h[:, idx].double().transpose(0, 1)  # (A, N, C)
    p = flat.double().requires_grad_()
    w1 = p[:, :c * hid].view(-1, c, hid)
    b1 = p[:, c * hid:c * hid + hid]
    w2 = p[:, c * hid + hid:2 * c * hid + hid].view(-1, hid, c)
    b2 = p[:, 2 * c * hid + hid:]
    y = x + F.gelu(x @ w1 + b1[:, None]) @ w2 + b2[:, None]
    dy = a * g[:, idx].double().transpose(0, 1) + coef * (y - x).detach()
    (d,) = torch.autograd.grad(y, p, dy)
    return ((1 - a) * x + a * y).detach(), d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x32768")
    ap.add_argument("--seeds", type=int, default=1024)
    ap.add_argument("--lanes", type=int, default=102)
    ap.add_argument("--hidden", type=int, default=16)
    args = ap.parse_args()
    f, n = map(int, args.shape.split("x"))
    c, lanes, hid, dev = f // args.seeds, args.lanes, args.hidden, "cuda"
    torch.manual_seed(0)
    h0 = torch.randn(n, f, device=dev).bfloat16()
    g = (torch.randn(n, f, device=dev) / n).bfloat16()
    flat = torch.randn(lanes, 2 * c * hid + hid + c, device=dev) * 0.5
    starts = (torch.linspace(0, args.seeds - 1, lanes).round().int() * c).to(dev)
    print(f"{n} x {f} bf16, {lanes} lanes of {c} features, hidden {hid}", flush=True)
    defaults = (tm.FWD_ROWS, tm.FWD_WARPS, tm.BWD_GROUP, tm.BWD_ROWS, tm.BWD_WARPS,
                tm.BWD_PROGRAMS)
    for case, a, coef in (("graft", 0.3, 0.0), ("training", 0.0, 2.0 / (n * c))):
        t = {"bounds": torch.stack([starts, torch.full_like(starts, c)], 1).int(),
             "lane_index": torch.arange(lanes, device=dev),
             "lane_blend": torch.full((lanes,), float(a != 0), device=dev),
             "lane_nonfinite": torch.zeros(lanes, dtype=torch.bool, device=dev),
             "lane_running": torch.ones(lanes, dtype=torch.bool, device=dev),
             "lane_train": torch.full((lanes,), coef != 0, dtype=torch.bool, device=dev),
             "lane_sizes": torch.full((lanes,), float(c), device=dev),
             "lane_recon": torch.full((lanes,), float("nan"), device=dev),
             "alpha": torch.full((lanes,), a, device=dev)}
        used, cf = torch.empty(lanes, device=dev), torch.empty(lanes, device=dev)
        want_out, want_d = reference(h0, flat, starts, c, hid, a, g, coef)
        fwd = partial(tm.seed_forward, flat=flat, chunk=c, hidden=hid, lanes=t, lane0=0,
                      save=True, recon=coef != 0, used=used, coef=cf)
        for tm.FWD_ROWS, tm.FWD_WARPS, align in FWD:
            h = h0.clone()
            kept, diff = fwd(h, align=align)
            idx = starts[:, None].long() + torch.arange(c, device=dev)
            torch.testing.assert_close(h[:, idx].transpose(0, 1).double(), want_out,
                                       rtol=8e-3, atol=1e-3)
            us = (timed(lambda fwd=fwd, align=align: fwd(h0.clone(), align=align))
                  - timed(lambda: h0.clone()))
            print(f"{case} forward  rows {tm.FWD_ROWS:3d} warps {tm.FWD_WARPS} align {align}: "
                  f"{us:7.1f} us (checked)", flush=True)
        for tm.BWD_GROUP, tm.BWD_ROWS, tm.BWD_WARPS, tm.BWD_PROGRAMS, align in BWD:
            bwd = partial(tm.seed_backward, kept, diff, g, flat, hid, t["bounds"], used, cf, 0,
                          coef != 0, align)
            torch.testing.assert_close(bwd().double(), want_d, rtol=2e-3, atol=1e-6)
            print(f"{case} backward group {tm.BWD_GROUP} rows {tm.BWD_ROWS:3d} warps "
                  f"{tm.BWD_WARPS} programs {tm.BWD_PROGRAMS:5d} align {align}: "
                  f"{timed(bwd):7.1f} us (checked)", flush=True)
    (tm.FWD_ROWS, tm.FWD_WARPS, tm.BWD_GROUP, tm.BWD_ROWS, tm.BWD_WARPS,
     tm.BWD_PROGRAMS) = defaults


if __name__ == "__main__":
    main()
