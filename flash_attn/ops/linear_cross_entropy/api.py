"""LM head + cross-entropy without the (tokens, vocab) logits: functional API.

``lm_head`` followed by ``F.cross_entropy`` keeps the logits, their log-softmax and then their
gradient alive at once: three (tokens, vocab) buffers, 1.6 GB each in fp32 for 8k tokens of
GPT-2's 50257 vocabulary. Here the tokens are processed ``chunk_size`` at a time: a chunk's
logits are computed by one matmul, turned into the loss and, in the same buffer, into dlogits
(fused cross-entropy kernel on the triton backend, in-place torch ops otherwise), and folded into
dhidden and dweight (and dbias) before the next chunk. Only one chunk of logits ever lives.

For reduction "mean" and "sum" the gradients are therefore computed during the forward and the
backward only scales them by the upstream gradient. For reduction "none" the upstream gradient
is per token and unknown during the forward, so the backward recomputes each chunk's logits
(one more matmul per chunk).

The chunked pass and its autograd Function are in ``function.py``; the module
(``LinearCrossEntropyLoss``) is in ``flash_attn.modules.losses``.
"""

from __future__ import annotations

import torch

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.cross_entropy import (
    KERNEL_DTYPES,
    check_cross_entropy_inputs,
    check_labels_in_range,
)
from flash_attn.ops.linear_cross_entropy.function import LinearCrossEntropyFunction
from flash_attn.ops.plans import PlanCache, call_signature
from flash_attn.utils.checks import check_float


def default_chunk_size(n_tokens: int, vocab: int, hidden_dim: int) -> int:
    """Tokens per chunk: hidden_dim, so a chunk of logits is as large as the weight.

    The gradient of the weight is held anyway, so this bounds the extra memory by a small
    multiple of the weight whatever the number of tokens, and keeps the matmuls at least
    hidden_dim rows tall (on a 2-core CPU, 83-row chunks ran 1.6x slower than 1024-row ones).
    Tiny heads get at least 2**22 logits (16 MB in fp32) per chunk.
    """
    return max(1, min(n_tokens, max(hidden_dim, 2**22 // max(vocab, 1))))


_plans = PlanCache()  # per call signature: (backend, chunk_size, options, softcap)


def _checked_plan(
    hidden,
    weight,
    labels,
    bias,
    ignore_index,
    label_smoothing,
    lse_square_scale,
    reduction,
    chunk_size,
    softcap,
    backend,
) -> tuple:
    """Check the arguments of :func:`linear_cross_entropy` but the label values; return its
    plan: (backend, chunk_size, cross-entropy options, softcap)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (vocab, hidden_dim), got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (..., hidden_dim) with hidden_dim = weight.shape[1] = "
            f"{weight.shape[1]}, got hidden {tuple(hidden.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have vocab >= 1 rows, got 0")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(
            f"hidden, weight and bias must share a dtype, got hidden {hidden.dtype}, "
            f"weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (vocab,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(labels, torch.Tensor) and labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    softcap = check_float("softcap", softcap, low=0.0)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (..., hidden_dim) -> (tokens, hidden_dim)
    labels = labels.reshape(-1) if isinstance(labels, torch.Tensor) else labels
    check_cross_entropy_inputs(
        hidden, labels, label_smoothing, ignore_index, reduction, lse_square_scale, "hidden"
    )
    vocab = weight.shape[0]
    backend = resolve_backend(backend, hidden.device, hidden.dtype)
    if backend == "triton" and hidden.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"hidden must be one of {KERNEL_DTYPES} for backend='triton', got {hidden.dtype}"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], vocab, hidden.shape[1])
    options = (float(label_smoothing), float(lse_square_scale), int(ignore_index))
    return backend, chunk_size, options, softcap


def linear_cross_entropy(
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
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without materialising the logits.

    Args:
        hidden: (..., hidden_dim) fp32, fp16 or bf16 (fp64 on the torch backend).
        weight: (vocab, hidden_dim), the LM head weight (``nn.Linear`` layout), hidden's dtype.
        labels: (...) int64, the leading shape of hidden; in [0, vocab) or ignore_index.
        bias: optional (vocab,), hidden's dtype.
        ignore_index, label_smoothing, lse_square_scale, reduction: as in
            :func:`flash_attn.ops.cross_entropy.cross_entropy_loss` (the z-loss is
            ``lse_square_scale * lse**2`` per token).
        chunk_size: tokens per chunk; None picks :func:`default_chunk_size`. Peak memory is
            about one (chunk_size, vocab) buffer on top of the inputs and their gradients.
        softcap: when > 0, the logits become softcap * tanh(logits / softcap) before the loss
            (Gemma 2's final_logit_softcapping); 0 leaves them as they are.
        backend: None/"auto", "triton" (fused cross-entropy kernel per chunk) or "torch".
    Returns:
        fp32 scalar, or (...) fp32 per-token losses for reduction="none".
    Raises:
        TypeError: non-float hidden/weight, mismatched dtypes, non-integer labels.
        ValueError: mismatched shapes or devices, unknown reduction, labels out of range,
            chunk_size < 1, softcap < 0.
    """
    key = call_signature(
        (hidden, weight, bias, labels),
        (ignore_index, label_smoothing, lse_square_scale, reduction, chunk_size, softcap, backend),
    )
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.keep(
            key,
            _checked_plan(
                hidden,
                weight,
                labels,
                bias,
                ignore_index,
                label_smoothing,
                lse_square_scale,
                reduction,
                chunk_size,
                softcap,
                backend,
            ),
        )
    backend, chunk_size, options, softcap = plan
    out_shape = labels.shape
    if hidden.ndim != 2:
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (..., hidden_dim) -> (tokens, hidden_dim)
    labels = labels.reshape(-1) if labels.ndim != 1 else labels
    check_labels_in_range(labels, weight.shape[0], ignore_index)  # where reads cost no sync
    labels = labels.long().contiguous()
    loss = LinearCrossEntropyFunction.apply(
        hidden,
        weight,
        bias,
        labels,
        options,
        softcap,
        reduction,
        chunk_size,
        backend,
        torch.is_grad_enabled(),
    )
    return loss.reshape(out_shape) if reduction == "none" else loss
