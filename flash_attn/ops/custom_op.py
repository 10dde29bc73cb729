"""``torch.library`` custom ops whose eager calls skip the dispatcher.

A custom op is what ``torch.compile`` traces (its fake implementation gives the shapes), but an
eager call through the dispatcher costs several kernel launches' worth of host time.
:func:`custom_op` registers the op as usual and returns a callable that, outside
``torch.compile``, runs the op's Python implementation directly, under a
``torch.autograd.Function`` built from the same ``setup_context`` and ``backward`` when a
gradient is needed: one implementation and one autograd formula, two ways to reach them.

Ops that mutate their inputs keep the dispatcher (it tracks the mutation for autograd).
"""

from __future__ import annotations

import torch


class EagerCustomOp:
    """A registered custom op (``.op``), its Python implementation (``.impl``), and the eager
    fast path (calling the instance)."""

    def __init__(self, name: str, op, impl):
        self.name, self.op, self.impl = name, op, impl
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
        if self.function is not None and torch.is_grad_enabled():
            for arg in args:
                if isinstance(arg, torch.Tensor) and arg.requires_grad:
                    return self.function.apply(*args)
        return self.impl(*args)


def custom_op(name: str, *, schema: str | None = None):
    """Decorator: ``torch.library.custom_op(name, mutates_args=(), schema=schema)`` of the
    function, wrapped in an :class:`EagerCustomOp`."""

    def wrap(fn) -> EagerCustomOp:
        op = torch.library.custom_op(name, mutates_args=(), schema=schema)(fn)
        return EagerCustomOp(name, op, fn)

    return wrap
