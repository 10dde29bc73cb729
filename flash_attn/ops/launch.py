"""What every Triton launcher shares: the device guard, launch plans, host integer helpers
(``cdiv``, ``next_power_of_2``), small helpers (contiguous aligned tensors, the JIT function
under a kernel's wrappers, the configs with the largest tiles), and the keys and caches of
what a call signature resolved to (:func:`launch_key`, :func:`call_signature`,
:class:`PlanCache`; ``flash_attn.ops.custom_op`` re-exports them).

Imported by the ``triton/`` folders of the op packages; it imports torch and triton only (and
:func:`flash_attn.ops.backend.interpreter_enabled`).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
from triton.runtime.jit import KernelInterface

from flash_attn.ops.backend import interpreter_enabled


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers (``triton.cdiv`` is a constexpr function: several times
    slower on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for 0), as ``triton.next_power_of_2`` on the host."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def contiguous_aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and at a 16-byte aligned address (a copy only where t is not both): what a
    launch plan needs of a tensor whose layout its key did not record, such as a gradient
    handed to a backward (Triton specialises pointers on their alignment)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


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

    def replay(self, values: tuple, positions: tuple) -> None:
        """Launch with the tensors ``values[i]`` for i in ``positions``, one for each of the
        plan's names (what :func:`launch` does after a plan's first call)."""
        args = self.args.copy()
        for slot, position in zip(self.slot_list, positions):
            args[slot] = values[position]
        self._launch(args)

    def _launch(self, args: list) -> None:
        driver = triton.runtime.driver.active
        stream = driver.get_current_stream(self.device)
        enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
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


_INTERPRETER = interpreter_enabled()  # read once, as Triton reads it when kernels are defined
MAX_PLANS = 4096  # launch plans kept by :func:`launch`; the oldest is dropped past this
_plans: dict = {}
_arg_names: dict = {}


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` through a :class:`LaunchPlan` kept per kernel, grid,
    current device and specialisation of the arguments: a tensor counts by its dtype and
    16-byte alignment (what Triton specialises on), anything else by its value. So every call
    after the first of its kind goes straight to the compiled kernel; under the CPU interpreter
    it is the usual launch."""
    if _INTERPRETER or not isinstance(kernel, KernelInterface):  # or a stand-in kernel
        kernel[grid](*args, **kwargs)
        return
    values = args + tuple(kwargs.values()) if kwargs else args
    # The device is the current one (the launchers' device guard sets it), read once rather
    # than from every tensor: a tensor's .device costs as much as its .dtype.
    key = (
        id(kernel),
        grid if type(grid) is tuple else _grid_key(grid),
        triton.runtime.driver.active.get_current_device(),
        *kwargs,
        *[(v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, torch.Tensor) else v for v in values],
    )
    entry = _plans.get(key)
    if entry is not None and entry[0].compiled is not None:
        entry[0].replay(values, entry[1])
        return
    if entry is None:
        if len(_plans) >= MAX_PLANS:
            del _plans[next(iter(_plans))]
        names = _arg_names.get(kernel)
        if names is None:
            names = _arg_names[kernel] = unwrap_jit(kernel).arg_names
        named = dict(zip(names, args)) | kwargs
        positions = tuple(i for i, v in enumerate(values) if isinstance(v, torch.Tensor))
        constants = {n: v for n, v in named.items() if not isinstance(v, torch.Tensor)}
        all_names = [*names[: len(args)], *kwargs]
        tensor_names = tuple(all_names[i] for i in positions)
        entry = _plans[key] = (LaunchPlan(kernel, grid, tensor_names, **constants), positions)
    plan, positions = entry
    plan(*[values[i] for i in positions])


def _grid_key(grid) -> tuple:
    """A grid function by its code and the values it closes over."""
    cells = grid.__closure__ or ()
    return (id(grid.__code__), *(cell.cell_contents for cell in cells))


# -- what a call signature resolved to, kept per signature -----------------------------------


def launch_key(t) -> tuple | None:
    """What a check or a launch reads of an argument that may be a tensor: its shape, strides,
    dtype, device and 16-byte alignment (Triton specialises pointers on it); None stays None,
    and anything else counts by its identity (the checks then name it)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)
    return (type(t), id(t))


def call_signature(tensors: tuple, options: tuple) -> tuple | None:
    """The key of a call's plan: the :func:`launch_key` of each of ``tensors``, the values of
    ``options`` (plain scalars, dtypes, strings) and ``FLASH_ATTN_BACKEND``; None while
    ``torch.compile`` traces (it traces the checks and the op instead)."""
    if torch.compiler.is_compiling():
        return None
    return (*map(launch_key, tensors), *options, os.environ.get("FLASH_ATTN_BACKEND"))


def _hashable(key) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


class PlanCache:
    """What the first call of each call signature checked and derived (its plan), so that later
    calls of the signature skip the checks. ``get`` of an unknown key (or of None, or of an
    unhashable one) is None; ``keep`` stores a plan under a key (one that ``get`` can find) and
    returns it, dropping the oldest plan past ``max_plans``."""

    def __init__(self, max_plans: int = 1024):
        self.max_plans = max_plans
        self.plans: dict = {}

    def get(self, key):
        if key is None:
            return None
        try:
            return self.plans.get(key)
        except TypeError:  # an option that is not hashable: no plan, the checks name it
            return None

    def keep(self, key, plan):
        if key is not None and _hashable(key):
            if len(self.plans) >= self.max_plans:
                del self.plans[next(iter(self.plans))]
            self.plans[key] = plan
        return plan
