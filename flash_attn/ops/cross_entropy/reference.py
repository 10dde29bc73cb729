"""Cross-entropy with label smoothing, logit scale and z-loss in plain PyTorch: CPU path and
test oracle.

Per row, with x = logit_scale * logits, lse = logsumexp(x), y the label, eps the label smoothing
and V the vocabulary:

    loss   = lse - (1 - eps) * x[y] - eps / V * sum(x) + z_loss
    z_loss = lse_square_scale * lse**2

which is ``F.cross_entropy(..., label_smoothing=eps)`` plus the z-loss of PaLM. Rows whose label
is ignore_index count neither in the sum nor in the mean's denominator.

Vocabulary-parallel (``process_group``): each rank holds the columns [rank * n_cols, (rank + 1)
* n_cols) of the logits and the global labels. lse is combined by an all-gather and the label
and smoothing terms by an all-reduce; every rank then holds the whole loss, and the gradient
reaching its logits is that of its own shard (no communication in the backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

REDUCTIONS = ("mean", "sum", "none")


def reduce_loss(loss: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str):
    """Reduce per-row losses like ``F.cross_entropy``: the mean is over non-ignored rows."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # All rows ignored gives 0 / 0 = nan, as F.cross_entropy does.
    return loss.sum() / (labels != ignore_index).sum().to(loss.dtype)


def shard_of(logits: torch.Tensor, process_group) -> tuple[int, int]:
    """(class_start, total_classes) of this rank's vocabulary shard (0, n_cols) without a group."""
    n_cols = logits.shape[-1]
    if process_group is None:
        return 0, n_cols
    return dist.get_rank(process_group) * n_cols, dist.get_world_size(process_group) * n_cols


def combined_lse(lse: torch.Tensor, process_group) -> torch.Tensor:
    """logsumexp over the ranks of each rank's (n_rows,) shard lse (no gradient)."""
    gathered = [torch.empty_like(lse) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, lse.detach().contiguous(), group=process_group)
    return torch.logsumexp(torch.stack(gathered), dim=0)


def summed(t: torch.Tensor, process_group) -> torch.Tensor:
    """Sum over the ranks of a (n_rows,) tensor (no gradient)."""
    total = t.detach().clone()
    dist.all_reduce(total, group=process_group)
    return total


def _with_global_value(local: torch.Tensor, value: torch.Tensor, slope=1.0) -> torch.Tensor:
    """value, with the gradient slope * d(local): a combined quantity whose gradient reaches
    this rank's shard as it would in the unsharded computation."""
    return value + (local - local.detach()) * slope


def cross_entropy_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace_backward: bool = False,
    *,
    logit_scale: float = 1.0,
    precomputed_lse: torch.Tensor | None = None,
    process_group=None,
    return_z_loss: bool = False,
):
    """Cross-entropy over the last dimension, differentiable by autograd.

    Args:
        logits: (n_rows, vocab) float, or this rank's (n_rows, vocab / world) shard with a
            process_group. Computed in fp32 (fp64 stays fp64), so an fp64 input gives an oracle.
        labels: (n_rows,) int64 in [0, vocab) or ignore_index.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.
        lse_square_scale: weight of the z-loss term lse**2.
        ignore_index: label value whose rows are skipped.
        reduction: "mean" (over non-ignored rows), "sum" or "none".
        inplace_backward: accepted for signature parity with the kernel path; autograd here
            always allocates the gradient.
        logit_scale: > 0, multiplies the logits first.
        precomputed_lse: (n_rows,) logsumexp of the logits, used (its value; the gradient is
            the softmax's) when logit_scale is 1 and label_smoothing 0, as flash-attn 2.x does.
        process_group: vocabulary-parallel group (see the module docstring), or None.
        return_z_loss: also return the z-loss part (reduced alike, no gradient).
    Returns:
        The loss: a scalar, or (n_rows,) for reduction="none"; fp32 (fp64 for fp64 logits);
        (loss, z_loss) when return_z_loss.
    """
    del inplace_backward
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale
    class_start, total_classes = shard_of(logits, process_group)
    ignored = labels == ignore_index
    local_labels = labels - class_start
    in_shard = (local_labels >= 0) & (local_labels < x.shape[-1]) & ~ignored
    lse = torch.logsumexp(x, dim=-1)
    # (n_rows, vocab) -> (n_rows,): the logit of each row's label, 0 where it is elsewhere
    x_label = x.gather(-1, torch.where(in_shard, local_labels, 0).unsqueeze(-1)).squeeze(-1)
    label_terms = -(1.0 - label_smoothing) * torch.where(in_shard, x_label, 0.0)
    if label_smoothing > 0.0:
        label_terms = label_terms - label_smoothing / total_classes * x.sum(dim=-1)
    if precomputed_lse is not None and logit_scale == 1.0 and label_smoothing == 0.0:
        lse = _with_global_value(lse, precomputed_lse.to(lse.dtype).detach())
    if process_group is not None:
        total_lse = combined_lse(lse, process_group)
        lse = _with_global_value(lse, total_lse, torch.exp(lse - total_lse).detach())
        label_terms = _with_global_value(label_terms, summed(label_terms, process_group))
    z_loss = lse_square_scale * lse.square()
    loss = torch.where(ignored, 0.0, lse + label_terms + z_loss)
    loss = reduce_loss(loss, labels, ignore_index, reduction)
    if not return_z_loss:
        return loss
    z_loss = torch.where(ignored, 0.0, z_loss.detach())
    return loss, reduce_loss(z_loss, labels, ignore_index, reduction)
