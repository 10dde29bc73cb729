"""What modifies the attention scores, described once for every layer: the functional API,
the torch backend, the Triton custom ops and the Triton launchers all take an
:class:`AttentionOptions`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class AttentionOptions:
    """Scalar options of attention (the tensors that modify the scores travel beside them).

    Every field is a plain scalar so that the custom ops can take them one by one, in this
    order (:meth:`values`), as their written-out schema names them
    (``flash_attn.ops.attention.function.OPTIONS_SCHEMA``; a test keeps the two in step).
    """

    softmax_scale: float
    causal: bool = False
    window_left: int = -1  # keys visible before the diagonal, -1 for unlimited
    window_right: int = -1  # keys visible after it, -1 for unlimited (0 with causal)
    softcap: float = 0.0
    dropout_p: float = 0.0
    # The backward's schedule: bit-reproducible, or faster with atomic adds (see triton/backward.py)
    deterministic: bool = False

    @classmethod
    def create(
        cls,
        headdim: int,
        softmax_scale: float | None = None,
        causal: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        dropout_p: float = 0.0,
        deterministic: bool = False,
    ) -> AttentionOptions:
        """The options of the public API's arguments (checked already); the scale defaults to
        1 / sqrt(headdim)."""
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(headdim)
        left, right = window_size
        return cls(
            float(softmax_scale),
            bool(causal),
            int(left),
            int(right),
            float(softcap),
            float(dropout_p),
            bool(deterministic),
        )

    def values(self) -> tuple:
        """The fields' values in their order: the custom ops' last arguments."""
        return tuple(getattr(self, name) for name in _FIELD_NAMES)

    @property
    def window_size(self) -> tuple[int, int]:
        """(left, right) as in the public API."""
        return (self.window_left, self.window_right)


_FIELD_NAMES = tuple(f.name for f in fields(AttentionOptions))
