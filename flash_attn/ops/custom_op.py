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
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["EagerCustomOp", "custom_op"]


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
