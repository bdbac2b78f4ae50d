"""Launching the layer's Triton kernels without the JIT's per-call dispatch.

`kernel[grid](...)` re-derives the kernel's specialisation from every argument, builds a cache
key string, checks globals and options, and (for an autotuned kernel) goes through the
autotuner's wrapper, on every call: about 40 us of host time a launch on the H200 machine's
Xeon, 84 us through the autotuner (benchmarks/results/probe_column_stats_h200_2026-12-03_s9b.log:
the same telemetry pass timed back to back, GPU idle between launches). A growing step makes
9-12 such launches, and where the host CPU is the limit (1024 x 8192) that is the step.

`fast(kernel)[grid](*args, **constexprs)` keeps the compiled kernel the first call made for
each specialisation (the dtypes and 16-byte alignment of the tensors, and for integers
whether they are 1, divisible by 16 and 32-bit: what Triton specialises on) and the
constexprs and launch options, then calls it directly (the compiled kernel's own runner:
current stream, launch hooks). An autotuned kernel is tuned by its autotuner at the first call
of each of its tuning keys, as before; afterwards that key's best configuration is launched
directly. Under the interpreter (CPU) every call goes through Triton as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from triton import knobs
from triton.runtime.autotuner import Autotuner

from .ops import interpreting

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
try:  # what Triton's CUDA driver uses for the current stream
    from torch._C import _cuda_getCurrentRawStream as _stream
except ImportError:  # a CPU-only build of torch
    def _stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream


# Host-side grid arithmetic: `triton.cdiv` and `triton.next_power_of_2` are Triton
# ConstexprFunctions, ~1.5 us a call on the host; a growing step makes a dozen such calls.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _spec(v: object) -> object:
    """The part of an argument a compiled Triton kernel was specialised on."""
    if type(v) is torch.Tensor or isinstance(v, torch.Tensor):  # (the common case first)
        return v.dtype, not v.data_ptr() & 15
    if type(v) is int:  # (not a bool)
        return v == 1, not v & 15, -(2**31) <= v < 2**31, v < 2**63
    return type(v)


class FastKernel:
    def __init__(self, kernel: object) -> None:
        self.kernel = kernel
        self.tuned = isinstance(kernel, Autotuner)
        self.jit = kernel.fn if self.tuned else kernel
        self.names = list(self.jit.arg_names)
        # an autotuned kernel's tuning key: its arguments (positions) that the autotuner keys on
        self.tuning = [self.names.index(k) for k in kernel.keys] if self.tuned else []
        self.interpreted = interpreting()  # as triton.jit decided when it made the kernel
        self.compiled: dict[tuple, tuple] = {}

    def __getitem__(self, grid: tuple | Callable) -> Callable[..., None]:
        return lambda *args, **meta: self.run(grid, args, meta)

    def key(self, args: tuple, meta: dict) -> tuple:
        """What selects a compiled kernel (with the current device): the arguments'
        specialisation, the constexprs and options, and an autotuned kernel's tuning values."""
        # (~4 us for the seed forward's 14 arguments on the project's 2-core CPU, 2.4 of it
        # torch's data_ptr and dtype; _spec inlined here took ~1 us less: one definition kept)
        return (tuple([_spec(a) for a in args]), tuple(meta.items()),
                *(args[i] if i < len(args) else meta.get(self.names[i]) for i in self.tuning))

    def run(self, grid: tuple | Callable, args: tuple, meta: dict) -> None:
        if self.interpreted:
            self.kernel[grid](*args, **meta)
            return
        device = torch.cuda.current_device()
        key = (device, *self.key(args, meta))
        hit = self.compiled.get(key)
        if hit is None:
            self.compiled[key] = self._first(grid, args, meta)
            return
        compiled, tail, config = hit
        if callable(grid):
            grid = grid({**meta, **config})
        gx, gy, gz = (*grid, 1, 1)[:3]
        if _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            compiled[(gx, gy, gz)](*args, *tail)  # a profiler's hooks see it through the runner
            return
        # the compiled kernel's C launcher, as its runner calls it (CompiledKernel.__getitem__)
        compiled.run(gx, gy, gz, _stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *tail)

    def _first(self, grid: tuple | Callable, args: tuple, meta: dict) -> tuple:
        """Launch through Triton (compiling, tuning) and keep what it ran."""
        compiled = self.kernel[grid](*args, **meta)
        config = {}
        if self.tuned:  # the autotuner returns nothing: compile its choice without running it
            config = self.kernel.best_config.all_kwargs()
            compiled = self.jit.warmup(*args, grid=grid, **meta, **config)
        if hasattr(compiled, "result"):  # Triton's asynchronous compile mode
            compiled = compiled.result()
        constexprs = self.names[len(args):]
        missing = [n for n in constexprs if n not in meta and n not in config]
        assert not missing and not set(meta) - set(self.names) - set(_OPTIONS), (
            f"{self.jit.__name__}: pass its tensors and scalars positionally and its "
            f"constexprs by name (missing {missing})")
        compiled._init_handles()  # (loads the binary: what its runner does first)
        # the constexprs' values are fixed for this key (it holds `meta`; the config is its own)
        return compiled, tuple(meta.get(n, config.get(n)) for n in constexprs), config


def _hooked(hook: object) -> bool:
    """A launch hook is set: Triton 3.6's are chains (never None, empty by default: its runner
    still builds the launch metadata and the C launcher calls the empty chains, ~2 us)."""
    return hook is not None and bool(getattr(hook, "calls", True))


_KERNELS: dict[int, FastKernel] = {}


def fast(kernel: object) -> FastKernel:
    """The launcher of a `triton.jit` (or autotuned) kernel, one per kernel."""
    k = _KERNELS.get(id(kernel))
    if k is None:
        k = _KERNELS[id(kernel)] = FastKernel(kernel)
    return k
