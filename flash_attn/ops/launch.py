"""What every Triton launcher shares: the device guard, launch plans, host integer helpers
(``cdiv``, ``next_power_of_2``) and small helpers (a tensor's strides as rows, the JIT function
under a kernel's wrappers, the configs with the largest tiles).

Imported by the ``triton/`` folders of the op packages; it imports torch and triton only. What
a launcher keeps per call signature is keyed and cached by :mod:`flash_attn.ops.plans`.
"""

from __future__ import annotations

import contextlib

import torch
import triton


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers (``triton.cdiv`` is a constexpr function: several times
    slower on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for 0), as ``triton.next_power_of_2`` on the host."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def row_strides(t: torch.Tensor) -> tuple[int, int] | None:
    """The (row, column) strides of t (..., N) read as M rows of N, with no copy; None where
    its leading dimensions do not collapse into one strided dimension (a launch then copies it
    contiguous)."""
    if t.numel() == 0:
        return t.shape[-1], 1
    try:
        return t.view(-1, t.shape[-1]).stride()
    except RuntimeError:
        return None


def unwrap_jit(kernel):
    """The ``triton.JITFunction`` under autotune / heuristics wrappers."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


def largest(configs: list, group, size) -> list:
    """The ``configs`` whose ``size(config)`` is the largest among the configs of the same
    ``group(config)``, in their order."""
    top = {}
    for c in configs:
        top[group(c)] = max(top.get(group(c), size(c)), size(c))
    return [c for c in configs if size(c) == top[group(c)]]


def device_guard(t: torch.Tensor):
    """Make t's GPU the current one for the launch (no-op on CPU, e.g. under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class LaunchPlan:
    """One kernel launched again and again at one key (shapes, strides, dtypes, options): the
    first call goes through Triton's usual path (autotuning where the kernel autotunes, the JIT's
    binder, compilation) and records the compiled kernel, the grid and every argument in
    parameter order; later calls go straight to the compiled kernel, replacing only the tensors.

    Args:
        kernel: a ``@triton.jit`` function, or one wrapped by ``triton.autotune``.
        grid: a tuple, or a function of the bound arguments (the config's included).
        tensors: the names of the arguments a call passes, in the order it passes them: the
            tensors that change from call to call.
        constants: every argument that stays the same at this key (scalars, strides, constexprs,
            placeholder tensors), and compile options (num_warps, ...) for a kernel that does not
            autotune.
    Under the CPU interpreter every call takes the usual path (there is nothing compiled to
    call).
    """

    def __init__(self, kernel, grid, tensors: tuple[str, ...], **constants):
        self.kernel = kernel
        self.grid = grid
        self.names = tuple(tensors)
        self.constants = constants
        self.compiled = None

    def __call__(self, *tensors) -> None:
        """Launch with ``tensors``, one for each of the plan's names, in their order."""
        if self.compiled is None:
            if len(tensors) != len(self.names):
                raise TypeError(f"launch plan: expected tensors {self.names}, got {len(tensors)}")
            self._first_call(dict(zip(self.names, tensors)))
            return
        args = self.args.copy()
        for slot, tensor in zip(self.slot_list, tensors):
            args[slot] = tensor
        self._launch(args)

    def _launch(self, args: list) -> None:
        driver = triton.runtime.driver.active
        stream = driver.get_current_stream(self.device)
        enter = _active_hook(triton.knobs.runtime.launch_enter_hook)
        leave = _active_hook(triton.knobs.runtime.launch_exit_hook)
        metadata = self.compiled.launch_metadata(self.dims, stream, *args) if enter else None
        self.run(
            *self.dims, stream, self.function, self.packed_metadata, metadata, enter, leave, *args
        )

    def _first_call(self, tensors: dict) -> None:
        from triton.compiler import CompiledKernel

        compiled = self.kernel[self.grid](**self.constants, **tensors)
        if not isinstance(compiled, CompiledKernel):  # the interpreter: no compiled kernel
            return
        fn = unwrap_jit(self.kernel)
        config = getattr(self.kernel, "best_config", None)
        chosen = config.kwargs if config is not None else {}
        given = {**self.constants, **tensors, **chosen}
        bound = fn.signature.bind(**{n: v for n, v in given.items() if n in fn.arg_names})
        bound.apply_defaults()
        arguments = bound.arguments
        grid = self.grid(arguments) if callable(self.grid) else self.grid
        self.dims = tuple(grid) + (1,) * (3 - len(grid))
        names = list(arguments)
        self.slot_list = tuple(names.index(name) for name in tensors)
        # The tensors of this call are replaced at every call: the plan does not keep them.
        self.args = [None if name in tensors else value for name, value in arguments.items()]
        self.device = triton.runtime.driver.active.get_current_device()
        self.run, self.function = compiled.run, compiled.function
        self.packed_metadata = compiled.packed_metadata
        self.compiled = compiled


def _active_hook(hook):
    """A launch hook, or None where there is none to call: Triton 3.9 keeps its hooks in a
    chain that is never None, and a launch with a chain builds the hooks' metadata even when the
    chain is empty."""
    return hook if getattr(hook, "calls", True) else None
