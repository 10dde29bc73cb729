"""LM head + cross-entropy in plain PyTorch: the test oracle of the chunked version.

It builds the full (tokens, vocab) logits, which is exactly what the chunked op avoids, so it
is for checking and for small inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flash_attn.ops.cross_entropy.reference import cross_entropy_ref


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)``, differentiable by autograd.

    Args:
        hidden: (..., hidden_dim) float.
        weight: (vocab, hidden_dim), the LM head, same dtype as hidden.
        labels: (...) int64 in [0, vocab) or ignore_index, same leading shape as hidden.
        bias: optional (vocab,).
        chunk_size: ignored (signature parity with the chunked op).
        softcap: when > 0, the logits become softcap * tanh(logits / softcap) first (in fp32,
            fp64 for fp64 inputs).
    Returns:
        fp32 (fp64 for fp64 inputs) scalar, or a loss per token shaped like labels for
        reduction="none".
    """
    del chunk_size
    # (..., hidden_dim) -> (tokens, vocab)
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    if softcap > 0.0:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logits = softcap * torch.tanh(logits / softcap)
    loss = cross_entropy_ref(
        logits, labels.reshape(-1), label_smoothing, lse_square_scale, ignore_index, reduction
    )
    return loss.reshape(labels.shape) if reduction == "none" else loss
