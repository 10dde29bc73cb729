"""``flash_attn.losses.cross_entropy`` of flash-attn 2.x: ``CrossEntropyLoss`` with the
official constructor, over :class:`flash_attn.ops.cross_entropy.CrossEntropyLoss`.

Nothing in the library imports this module: it exists for code written for flash-attn 2.x.
Unlike the official module, it also runs on CPU tensors (the torch backend).
"""

from __future__ import annotations

from flash_attn.ops import cross_entropy as _ops

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(_ops.CrossEntropyLoss):
    """forward(input (n_rows, vocab), target (n_rows,), precomputed_lse=None) -> the loss
    (a scalar, or (n_rows,) for reduction="none"), and the z-loss with return_z_loss."""

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, logit_scale=1.0,
                 lse_square_scale=0.0, inplace_backward=False, process_group=None,
                 return_z_loss=False):  # fmt: skip
        super().__init__(
            ignore_index, label_smoothing, lse_square_scale, reduction, inplace_backward,
            logit_scale=logit_scale, process_group=process_group, return_z_loss=return_z_loss,
        )  # fmt: skip

    def forward(self, input, target, precomputed_lse=None):  # noqa: A002 (the official name)
        return super().forward(input, target, precomputed_lse)
