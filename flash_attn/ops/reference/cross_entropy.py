"""Cross-entropy with label smoothing and z-loss in plain PyTorch: CPU path and test oracle.

Per row, with lse = logsumexp(x), y the label, eps the label smoothing and V the vocabulary:

    loss = lse - (1 - eps) * x[y] - eps / V * sum(x) + lse_square_scale * lse**2

which is ``F.cross_entropy(..., label_smoothing=eps)`` plus the z-loss of PaLM. Rows whose label
is ignore_index count neither in the sum nor in the mean's denominator.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def reduce_loss(loss: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str):
    """Reduce per-row losses like ``F.cross_entropy``: the mean is over non-ignored rows."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # All rows ignored gives 0 / 0 = nan, as F.cross_entropy does.
    return loss.sum() / (labels != ignore_index).sum().to(loss.dtype)


def cross_entropy_ref(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
    inplace_backward: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Cross-entropy over the last dimension, differentiable by autograd.

    Args:
        logits: (n_rows, vocab) float. Computed in fp32 (fp64 stays fp64), so an fp64 input
            gives an oracle.
        labels: (n_rows,) int64 in [0, vocab) or ignore_index.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.
        lse_square_scale: weight of the z-loss term lse**2.
        ignore_index: label value whose rows are skipped.
        reduction: "mean" (over non-ignored rows), "sum" or "none".
        inplace_backward: accepted for signature parity with the kernel path; autograd here
            always allocates the gradient.
    Returns:
        The loss: a scalar, or (n_rows,) for reduction="none"; fp32 (fp64 for fp64 logits).
    """
    del inplace_backward
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ignored = labels == ignore_index
    safe_labels = torch.where(ignored, 0, labels)
    lse = torch.logsumexp(x, dim=-1)
    # (n_rows, vocab) -> (n_rows,): the logit of each row's label
    x_label = x.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    loss = lse - (1.0 - label_smoothing) * x_label
    if label_smoothing > 0.0:
        loss = loss - label_smoothing * x.mean(dim=-1)
    if lse_square_scale != 0.0:
        loss = loss + lse_square_scale * lse.square()
    loss = torch.where(ignored, 0.0, loss)
    return reduce_loss(loss, labels, ignore_index, reduction)
