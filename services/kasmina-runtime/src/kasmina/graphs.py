"""CUDA graphs of a growing layer, for layers whose step is bound by the host CPU
(`KasminaConfig.cuda_graphs`, `KasminaLayer.set_cuda_graphs`).

A small layer's growing step launches ~50 kernels at tens of microseconds of host time each
(benchmarks/NOTES.md, "The training step"): the GPU idles most of the step. Here the layer's
forward (host and seeds) and its backward are two graphs replayed by one autograd node, and
the seeds' optimizer step a third: a handful of launches a step whatever the number of seeds.
(`seed_forward`, called on a host output by `DualPathLayer`, graphs the seeds' part alone.)
The layer's fixed parameter sets and lane tensors (DESIGN §3.1) are what make this possible:
every address a graph reads stays put until the next commit, which drops the graphs.

On by default ("auto") where it pays and skips nothing: a host that is exactly nn.Linear or
Conv1D with no hooks (`fused.host_ok`) whose GEMM is small (AUTO_MACS), on either path.

The rules (each is checked; where one does not hold the step runs eagerly, never wrongly):
- Only training-mode CUDA forwards with grad enabled while some blueprint runs, in one process
  (under torch.distributed the seeds' all-reduce and DDP's hooks stay eager), without a
  GradScaler at `step` (its scale lives on the host's side).
- A graph is captured at the second forward of the same kind (telemetry or not, input shape,
  dtype, autocast) after a commit; the first runs eagerly and warms up the kernels. A host
  parameter whose storage was replaced (`p.data = ...`) is seen and the pass captured anew.
- One forward per backward: a second forward before the first one's backward runs eagerly
  (the graph's saved activations are live until the backward replays). A forward inside a
  graph the caller is capturing runs eagerly (into the caller's graph).
- The host's forward is captured: its forward hooks run at capture only (they are replayed
  as the kernels they launched, not as Python).
- The seeds' gradients of a graphed backward go to buffers the layer owns (not `.grad`); `step`
  consumes and zeroes them, so gradient accumulation over micro-batches still sums. The host's
  and the input's gradients reach `.grad` through autograd as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import distributed

if TYPE_CHECKING:
    from .layer import KasminaLayer

_MAX_KINDS = 4  # forward kinds kept per commit (telemetry on/off x a couple of input shapes)
# KasminaConfig.cuda_graphs="auto" graphs a layer whose host GEMM is under this many
# multiply-adds (rows x in x out; float32 counts twice: its GEMM is half bf16's speed). H200,
# bf16, 1,024 seeds, 10 % growing (benchmarks/NOTES.md, s10c), eager / graphed step over the
# bare one, training and grafting: 1024 x 8192 rows (8.6e9) 3.0-4.2 / 1.26-1.34; 2048 x 8192
# (3.4e10) 2.43-3.25 / 0.96-1.09; 2048 x 16384 (6.9e10) 2.40-3.19 / 1.23-1.30; 4096 x 8192
# (1.4e11) 1.54-2.03 / 1.30-1.34; 4096 x 16384 (2.7e11) 1.16-1.27 / 1.26-1.29; 4096 x 32768
# (5.5e11) 1.10-1.12 / 1.19-1.24. Above ~2e11 the GPU is busy and the graphs' copies of the
# input, output and gradients cost more than the launches they save.
AUTO_MACS = 2 * 10**11


@dataclass
class _Pass:
    """The forward and backward graphs of one kind of forward, and their static tensors."""

    inp: torch.Tensor  # the static input: x (the whole layer) or h (the seeds' part)
    out: torch.Tensor
    grad_out: torch.Tensor
    grads: list[torch.Tensor | None]  # of the input (if it requires grad) and the host's params
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    host: list[torch.nn.Parameter]  # the host parameters it differentiates (whole layer only)
    pointers: list[int]  # their addresses at capture: one that moved makes the pass stale
    pending: bool = False  # forward replayed, its backward not yet


@dataclass
class _Step:
    graph: torch.cuda.CUDAGraph
    loss: torch.Tensor | None


@dataclass
class SeedGraphs:
    """A layer's graphs. Not copied by deepcopy or pickle (a copy captures its own)."""

    passes: dict[tuple, _Pass] = field(default_factory=dict)
    steps: dict[bool, _Step] = field(default_factory=dict)
    warm: set = field(default_factory=set)  # kinds run eagerly once since the last commit
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # bank key -> its gradient
    dirty: bool = False  # a graphed backward wrote `grads` since the last step
    auto: bool = False  # KasminaConfig.cuda_graphs="auto": only where `worth_it`

    def __deepcopy__(self, memo: dict) -> SeedGraphs:
        return SeedGraphs(auto=self.auto)

    def __getstate__(self) -> dict:
        return {"auto": self.auto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(auto=state.get("auto", False))

    def clear(self) -> None:
        """At a commit: the lanes change, so every graph is stale."""
        self.passes.clear()
        self.steps.clear()
        self.warm.clear()

    # ------------------------------------------------------------------ forward / backward
    def forward(self, layer: KasminaLayer, inp: torch.Tensor, tracking: bool, with_host: bool
                ) -> torch.Tensor | None:
        """The graphed forward of `inp` (x through host and seeds with `with_host`, else the
        host's output h through the seeds), or None where the layer runs eagerly."""
        if not (inp.is_cuda and layer.training and torch.is_grad_enabled() and inp.numel()
                and distributed.world_size() == 1) or torch.cuda.is_current_stream_capturing():
            return None  # (a graph the caller is capturing holds this forward eagerly)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        if self.auto and not (with_host and worth_it(layer, inp, autocast)):
            return None
        kind = (with_host, tracking, tuple(inp.shape), inp.dtype, inp.requires_grad, autocast)
        entry = self.passes.get(kind)
        if entry is not None and entry.pointers != [p.data_ptr() for p in entry.host]:
            entry = self.passes.pop(kind)  # a host parameter was replaced: capture anew
        if entry is None:
            if kind not in self.warm or len(self.passes) >= _MAX_KINDS:
                self.warm.add(kind)
                return None
            entry = self.passes[kind] = self._capture(layer, inp, tracking, with_host)
        if entry.pending:  # a second forward before the first one's backward
            return None
        return _Replay.apply(inp, self, entry, *entry.host, *(b.flat for b in layer.banks.values()))

    def _capture(self, layer: KasminaLayer, inp: torch.Tensor, tracking: bool, with_host: bool
                 ) -> _Pass:
        pool = torch.cuda.graph_pool_handle()  # its own: another pass may be live meanwhile
        for key, bank in layer.banks.items():
            if key not in self.grads:
                self.grads[key] = torch.zeros_like(bank.flat)
        host = [p for p in layer.host.parameters() if p.requires_grad] if with_host else []
        static_in = inp.detach().clone().requires_grad_(inp.requires_grad)
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd, pool=pool, capture_error_mode="thread_local"), \
                _aliased(layer.host if with_host else None, host) as host_views, \
                _aliased(layer.banks, [b.flat for b in layer.banks.values()]) as flats:
            out = (layer._host_and_seeds(static_in, tracking) if with_host
                   else layer._seed_forward_eager(static_in, False, tracking))
        grad_out = torch.zeros_like(out)
        wrt = ([static_in] if inp.requires_grad else []) + host_views
        with torch.cuda.graph(bwd, pool=pool, capture_error_mode="thread_local"):
            grads = list(torch.autograd.grad(out, wrt + flats, grad_out, allow_unused=True))
            for key, g in zip(layer.banks, grads[len(wrt):], strict=True):
                if g is not None:
                    self.grads[key].add_(g)
        if not inp.requires_grad:
            grads.insert(0, None)
        return _Pass(static_in, out.detach(), grad_out, grads[:len(host) + 1], fwd, bwd, host,
                     [p.data_ptr() for p in host])

    # ------------------------------------------------------------------ the seeds' step
    def fold(self, layer: KasminaLayer) -> None:
        """Hand the graphed backward's gradients to `.grad` (an eager step reads them there)."""
        if not self.dirty:
            return
        for key, bank in layer.banks.items():
            buf = self.grads[key]
            bank.flat.grad = buf.clone() if bank.flat.grad is None else bank.flat.grad + buf
            buf.zero_()
        self.dirty = False

    def step(self, layer: KasminaLayer, loss: torch.Tensor | float | None,
             scaler: object) -> bool:
        """The seeds' step as a graph replay; False where it must run eagerly (after `fold`)."""
        for entry in self.passes.values():
            entry.pending = False
        if not self.dirty:  # no graphed backward since the last step (fold has nothing to do):
            return False  # the common case of a layer "auto" leaves eager, on any device
        eager_grads = any(bank.flat.grad is not None for bank in layer.banks.values())
        if eager_grads or scaler is not None or distributed.world_size() > 1:
            self.fold(layer)
            return False
        kind = loss is not None
        entry = self.steps.get(kind)
        if entry is None:
            if ("step", kind) not in self.warm:
                self.warm.add(("step", kind))
                self.fold(layer)
                return False
            entry = self.steps[kind] = self._capture_step(layer, kind)
        if entry.loss is not None:
            if isinstance(loss, torch.Tensor):
                entry.loss.copy_(loss.detach().reshape(()))
            else:
                entry.loss.fill_(float(loss))
        entry.graph.replay()
        self.dirty = False
        return True

    def _capture_step(self, layer: KasminaLayer, has_loss: bool) -> _Step:
        static_loss = torch.zeros((), device=layer.alpha.device) if has_loss else None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for key, bank in layer.banks.items():
                bank.flat.grad = self.grads[key]
            layer._step_seeds(static_loss, None)
            for key, bank in layer.banks.items():
                bank.flat.grad = None
                self.grads[key].zero_()
        return _Step(graph, static_loss)


def for_setting(setting: bool | str) -> SeedGraphs | None:
    """A layer's graphs for KasminaConfig.cuda_graphs (None: off)."""
    return SeedGraphs(auto=setting == "auto") if setting else None


def worth_it(layer: KasminaLayer, x: torch.Tensor, autocast: torch.dtype | None) -> bool:
    """cuda_graphs="auto": the host is exactly nn.Linear or Conv1D with no hooks (so no hook is
    skipped, and its forward has no data-dependent Python a graph would freeze) and its GEMM
    is under AUTO_MACS."""
    from . import fused
    if not fused.host_ok(layer.host):
        return False
    macs = x.numel() * layer.host.weight.numel() // x.shape[-1]  # rows x in x out
    return macs * (2 if (autocast or x.dtype) == torch.float32 else 1) < AUTO_MACS


@contextlib.contextmanager
def _aliased(module: torch.nn.Module | None, params: list[torch.Tensor]
             ) -> Iterator[list[torch.Tensor]]:
    """`module` reads views of `params` while a forward is captured: the backward graph
    differentiates with respect to the views, so it never reaches the parameters' own
    AccumulateGrad nodes. Those were made on the stream of an earlier eager step and outlive it
    while the user still holds that step's loss; a captured backward that ends in one fails with
    cudaErrorStreamCaptureImplicit (measured on an H200, torch 2.11)."""
    views = [p.view_as(p) for p in params]
    ids = {id(p): v for p, v in zip(params, views, strict=True)}
    owners = [(m, name, p) for m in (module.modules() if module is not None else ())
              for name, p in m._parameters.items() if id(p) in ids]
    for m, name, p in owners:
        m._parameters[name] = ids[id(p)]
    try:
        yield views
    finally:
        for m, name, p in owners:
            m._parameters[name] = p


class _Replay(torch.autograd.Function):
    """One autograd node for a graphed forward: replays the forward graph, and in backward the
    backward graph, which adds the seeds' gradients to the layer's buffers and hands the
    input's and the host's to autograd (static tensors: autograd clones what it keeps)."""

    @staticmethod
    def forward(ctx, inp, graphs, entry, *params):  # noqa: ANN001, ANN205
        entry.inp.copy_(inp)
        entry.fwd.replay()
        entry.pending = True
        ctx.graphs, ctx.entry, ctx.banks = graphs, entry, len(params) - len(entry.host)
        return entry.out.clone()  # the caller may keep it past the next replay

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        entry = ctx.entry
        entry.grad_out.copy_(grad)
        entry.bwd.replay()
        entry.pending = False
        ctx.graphs.dirty = True
        return (entry.grads[0], None, None, *entry.grads[1:], *([None] * ctx.banks))
