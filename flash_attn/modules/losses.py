"""Loss modules: cross-entropy and the LM head + cross-entropy, over the fused ops
(:func:`flash_attn.ops.cross_entropy.cross_entropy_loss`,
:func:`flash_attn.ops.linear_cross_entropy.linear_cross_entropy`).

``CrossEntropyLoss2x`` has flash-attn 2.x's constructor; ``flash_attn.losses.cross_entropy``
re-exports it as ``CrossEntropyLoss``.
"""

from __future__ import annotations

import torch
from torch import nn

from flash_attn.ops.cross_entropy import check_reduction, cross_entropy_loss
from flash_attn.ops.linear_cross_entropy import linear_cross_entropy


class CrossEntropyOptions(nn.Module):
    """The options shared by :class:`CrossEntropyLoss` and ``LinearCrossEntropyLoss``."""

    def __init__(
        self,
        ignore_index: int,
        label_smoothing: float,
        lse_square_scale: float,
        reduction: str,
        backend: str | None,
    ):
        super().__init__()
        check_reduction(reduction)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.lse_square_scale = label_smoothing, lse_square_scale
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"lse_square_scale={self.lse_square_scale}, reduction={self.reduction!r}"
        )


class CrossEntropyLoss(CrossEntropyOptions):
    """``nn.CrossEntropyLoss`` with z-loss and a fused kernel; see :func:`cross_entropy_loss`.

    forward(logits (n_rows, vocab), labels (n_rows,) int64, precomputed_lse=None) -> scalar, or
    (n_rows,) for reduction="none"; (loss, z_loss) with return_z_loss.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        reduction: str = "mean",
        inplace_backward: bool = False,
        backend: str | None = None,
        *,
        logit_scale: float = 1.0,
        process_group=None,
        return_z_loss: bool = False,
    ):
        super().__init__(ignore_index, label_smoothing, lse_square_scale, reduction, backend)
        self.inplace_backward, self.logit_scale = inplace_backward, logit_scale
        self.process_group, self.return_z_loss = process_group, return_z_loss

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        precomputed_lse: torch.Tensor | None = None,
    ):
        return cross_entropy_loss(
            logits,
            labels,
            self.label_smoothing,
            self.lse_square_scale,
            self.ignore_index,
            self.reduction,
            self.inplace_backward,
            logit_scale=self.logit_scale,
            precomputed_lse=precomputed_lse,
            process_group=self.process_group,
            return_z_loss=self.return_z_loss,
            backend=self.backend,
        )


class LinearCrossEntropyLoss(CrossEntropyOptions):
    """LM head + cross-entropy in chunks; see :func:`linear_cross_entropy`.

    forward(hidden (..., hidden_dim), weight (vocab, hidden_dim), labels (...), bias=None)
    -> fp32 scalar, or per-token losses for reduction="none". The weight is passed in (not
    owned) so it can stay tied to the embedding of the model that calls this.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        reduction: str = "mean",
        chunk_size: int | None = None,
        backend: str | None = None,
        softcap: float = 0.0,
    ):
        super().__init__(ignore_index, label_smoothing, lse_square_scale, reduction, backend)
        self.chunk_size, self.softcap = chunk_size, softcap

    def forward(self, hidden, weight, labels, bias=None):
        return linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias,
            self.ignore_index,
            self.label_smoothing,
            self.lse_square_scale,
            self.reduction,
            self.chunk_size,
            self.softcap,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, softcap={self.softcap}"


class CrossEntropyLoss2x(CrossEntropyLoss):
    """flash-attn 2.x's ``CrossEntropyLoss``: forward(input (n_rows, vocab), target (n_rows,),
    precomputed_lse=None) -> the loss (a scalar, or (n_rows,) for reduction="none"), and the
    z-loss with return_z_loss. Unlike the official module, it also runs on CPU tensors (the
    torch backend)."""

    def __init__(
        self,
        ignore_index=-100,
        reduction="mean",
        label_smoothing=0.0,
        logit_scale=1.0,
        lse_square_scale=0.0,
        inplace_backward=False,
        process_group=None,
        return_z_loss=False,
    ):
        super().__init__(
            ignore_index,
            label_smoothing,
            lse_square_scale,
            reduction,
            inplace_backward,
            logit_scale=logit_scale,
            process_group=process_group,
            return_z_loss=return_z_loss,
        )

    def forward(self, input, target, precomputed_lse=None):  # noqa: A002 (the official name)
        return super().forward(input, target, precomputed_lse)
