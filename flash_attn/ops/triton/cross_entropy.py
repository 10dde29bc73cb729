"""``flash_attn.ops.triton.cross_entropy`` of flash-attn 2.x: ``cross_entropy_loss`` with the
official arguments and per-row results, over our ``flash_attn.ops.cross_entropy``.

Nothing in the library imports this module: it exists for code written for flash-attn 2.x.
"""

from __future__ import annotations

import torch

from flash_attn.ops.cross_entropy import cross_entropy_loss as _cross_entropy_loss

__all__ = ["cross_entropy_loss"]


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    precomputed_lse: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    ignore_index=-100,
    inplace_backward: bool = False,
    process_group=None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of logits (n_rows, vocab) (this rank's vocabulary shard with a
    process_group) against labels (n_rows,); arguments as in
    :func:`flash_attn.ops.cross_entropy.cross_entropy_loss`.

    Returns:
        losses: (n_rows,) fp32, z-loss included, 0 where the label is ignore_index.
        z_losses: (n_rows,) fp32, lse_square_scale * lse**2, for logging (no gradient).
    """
    return _cross_entropy_loss(
        logits, labels, label_smoothing, lse_square_scale, ignore_index, "none",
        inplace_backward, logit_scale=logit_scale, precomputed_lse=precomputed_lse,
        process_group=process_group, return_z_loss=True, backend=backend,
    )  # fmt: skip
