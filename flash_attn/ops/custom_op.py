"""``torch.library`` custom ops whose eager calls skip the dispatcher.

A custom op is what ``torch.compile`` traces (its fake implementation gives the shapes), but an
eager call through the dispatcher costs several kernel launches' worth of host time.
:func:`custom_op` registers the op as usual and returns a callable that, outside
``torch.compile``, runs the op's Python implementation directly, under a
``torch.autograd.Function`` built from the same ``setup_context`` and ``backward`` when a
gradient is needed: one implementation and one autograd formula, two ways to reach them.

An op that mutates its inputs takes the dispatcher where autograd could see the mutation
(grad mode on and an input that requires grad); elsewhere (inside an autograd Function's forward
or backward, or without gradients) its eager call runs the implementation directly and bumps the
mutated tensors' versions, as the dispatcher would.

Also what the functional APIs share to check once per call signature: :func:`launch_key`,
:func:`call_signature` and :class:`PlanCache`.
"""

from __future__ import annotations

import inspect
import os

import torch


class EagerCustomOp:
    """A registered custom op (``.op``), its Python implementation (``.impl``), and the eager
    fast path (calling the instance)."""

    def __init__(self, name: str, op, impl, mutated: tuple = ()):
        self.name, self.op, self.impl = name, op, impl
        self.mutated = mutated  # positions of the arguments the op writes into
        self.function = None

    def register_fake(self, fn):
        """As ``CustomOpDef.register_fake``."""
        return self.op.register_fake(fn)

    def register_autograd(self, backward, *, setup_context) -> None:
        """As ``CustomOpDef.register_autograd``; the eager path uses the same two functions."""
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        self.function = type(
            self.name.split("::")[-1],
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        if self.mutated:
            if torch.is_grad_enabled() and any(
                isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args
            ):
                return self.op(*args)
            output = self.impl(*args)
            torch.autograd.graph.increment_version([args[i] for i in self.mutated])
            return output
        if self.function is not None and torch.is_grad_enabled():
            for arg in args:
                if isinstance(arg, torch.Tensor) and arg.requires_grad:
                    return self.function.apply(*args)
        return self.impl(*args)


def custom_op(name: str, *, schema: str | None = None, mutates_args: tuple = ()):
    """Decorator: ``torch.library.custom_op(name, mutates_args=mutates_args, schema=schema)`` of
    the function, wrapped in an :class:`EagerCustomOp`."""

    def wrap(fn) -> EagerCustomOp:
        op = torch.library.custom_op(name, mutates_args=mutates_args, schema=schema)(fn)
        names = list(inspect.signature(fn).parameters)
        return EagerCustomOp(name, op, fn, tuple(names.index(arg) for arg in mutates_args))

    return wrap


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
