"""LM head + cross-entropy without the (tokens, vocab) logits: chunked autograd Function.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.cross_entropy import (
    KERNEL_DTYPES,
    CrossEntropyOptions,
    check_cross_entropy_inputs,
    check_labels_in_range,
)
from flash_attn.utils.checks import check_float


def default_chunk_size(n_tokens: int, vocab: int, hidden_dim: int) -> int:
    """Tokens per chunk: hidden_dim, so a chunk of logits is as large as the weight.

    The gradient of the weight is held anyway, so this bounds the extra memory by a small
    multiple of the weight whatever the number of tokens, and keeps the matmuls at least
    hidden_dim rows tall (on a 2-core CPU, 83-row chunks ran 1.6x slower than 1024-row ones).
    Tiny heads get at least 2**22 logits (16 MB in fp32) per chunk.
    """
    return max(1, min(n_tokens, max(hidden_dim, 2**22 // max(vocab, 1))))


def _loss_and_dlogits_(logits, labels, dloss, options, backend):
    """Per-row loss (chunk,) fp32 of a chunk of logits (chunk, vocab).

    ``logits`` is overwritten: with the gradient dloss * dloss_row/dx in its own dtype when
    ``dloss`` (chunk,) fp32, the upstream gradient of each row's loss, is given; with scratch
    values otherwise (torch backend).
    """
    label_smoothing, lse_square_scale, ignore_index = options
    if backend == "triton":
        kernel_options = (label_smoothing, 1.0, lse_square_scale, ignore_index)  # logit_scale 1
        loss, _, lse = torch.ops.flash_attn.cross_entropy_fwd(
            logits, labels, None, *kernel_options, True
        )
        if dloss is not None:
            torch.ops.flash_attn.cross_entropy_bwd_inplace(
                dloss, logits, lse, labels, *kernel_options
            )
        return loss
    # Plain torch, in place on an fp32 view of the chunk (a copy only for fp16/bf16 logits):
    # exp(x - max) overwrites x, so the chunk needs no second chunk-sized buffer.
    x = logits.float()
    vocab = x.shape[1]
    ignored = labels == ignore_index
    safe_labels = torch.where(ignored, 0, labels).unsqueeze(1)
    loss = -(1.0 - label_smoothing) * x.gather(1, safe_labels).squeeze(1)
    if label_smoothing > 0.0:
        loss = loss - label_smoothing * x.mean(dim=1)
    row_max = x.amax(dim=1, keepdim=True)
    sum_exp = x.sub_(row_max).exp_().sum(dim=1)  # x is now exp(x - max)
    lse = row_max.squeeze(1) + sum_exp.log()
    loss = loss + lse
    if lse_square_scale != 0.0:
        loss = loss + lse_square_scale * lse.square()
    loss = torch.where(ignored, 0.0, loss)
    if dloss is None:
        return loss
    # softmax * (1 + 2 z lse) - (1 - eps) * onehot - eps / V, times the row's upstream gradient
    x.mul_(((1.0 + 2.0 * lse_square_scale * lse) / sum_exp).unsqueeze(1))
    x.scatter_add_(1, safe_labels, torch.full_like(lse, label_smoothing - 1.0).unsqueeze(1))
    if label_smoothing > 0.0:
        x.sub_(label_smoothing / vocab)
    x.mul_(torch.where(ignored, 0.0, dloss).unsqueeze(1))
    if x is not logits:
        logits.copy_(x)
    return loss


def _softcap_(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """logits (chunk, vocab) -> softcap * tanh(logits / softcap), in place; returns the slope
    1 - tanh(logits / softcap)**2 (fp32), the derivative of the capped logits.

    tanh is taken in fp32 and rounded once into the logits' dtype; the slope costs one more
    chunk-sized buffer, freed with the chunk.
    """
    tanh = torch.tanh(logits.float() / softcap)
    torch.mul(tanh, softcap, out=logits)
    return tanh.square_().neg_().add_(1.0)


def _chunked_pass(hidden, weight, bias, labels, dloss, scale, options, softcap, chunk_size,
                  backend, needs):  # fmt: skip
    """One pass over the token chunks: per-token loss and the gradients flagged in ``needs``.

    Args:
        hidden (tokens, hidden_dim), weight (vocab, hidden_dim), bias (vocab,) or None,
        labels (tokens,); dloss (tokens,) fp32 upstream gradient of each token's loss, or None
        for the loss alone.
        scale: fp32 scalar tensor multiplying every gradient. The mean's 1/tokens is applied
            here, after the matmuls, rather than to dlogits: in fp16, softmax / 8192 would
            underflow to zero.
        softcap: > 0: the logits become softcap * tanh(logits / softcap) first; 0: unchanged.
        needs: (hidden, weight, bias) booleans.
    Returns:
        loss (tokens,) fp32, and dhidden, dweight, dbias in their inputs' dtypes, or None where
        not needed.
    """
    n_tokens = hidden.shape[0]
    if dloss is None:
        needs = (False, False, False)
    device = hidden.device
    loss = torch.empty(n_tokens, dtype=torch.float32, device=device)
    dhidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if needs[0] else None
    # dweight sums over every chunk: accumulate in fp32 whatever the weight's dtype.
    f32 = dict(dtype=torch.float32, device=device)
    dweight = torch.zeros(weight.shape, **f32) if needs[1] else None
    dbias = torch.zeros(weight.shape[0], **f32) if needs[2] else None
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        h = hidden[start:end]
        logits = F.linear(h, weight, bias)  # (chunk, vocab): the only logits alive
        slope = _softcap_(logits, softcap) if softcap > 0.0 else None
        chunk_dloss = None if dloss is None else dloss[start:end]
        loss[start:end] = _loss_and_dlogits_(
            logits, labels[start:end], chunk_dloss, options, backend
        )
        dlogits = logits if slope is None or not any(needs) else logits.mul_(slope)
        if dhidden is not None:
            dhidden[start:end] = (dlogits @ weight).float().mul_(scale)
        if dweight is not None:
            if dlogits.dtype == torch.float32:
                dweight.addmm_(dlogits.t(), h)
            else:
                # A half-precision matmul (fp32 accumulation inside), summed across chunks in
                # fp32: upcasting the chunk instead would double its memory and lose tensor cores.
                dweight += dlogits.t() @ h
        if dbias is not None:
            dbias += dlogits.sum(0, dtype=torch.float32)
        del logits, dlogits, slope
    dweight = None if dweight is None else dweight.mul_(scale).to(weight.dtype)
    dbias = None if dbias is None else dbias.mul_(scale).to(weight.dtype)
    return loss, dhidden, dweight, dbias


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked ``cross_entropy(hidden @ weight.T + bias, labels)``; see the module docstring."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, options, softcap, reduction, chunk_size, backend,
        grad_enabled,
    ):  # fmt: skip
        # grad_enabled: grad mode outside this call (inside forward it is always off); without
        # it, inference skips every gradient computation.
        needs = (
            grad_enabled and hidden.requires_grad,
            grad_enabled and weight.requires_grad,
            grad_enabled and bias is not None and bias.requires_grad,
        )
        one = torch.ones((), dtype=torch.float32, device=hidden.device)
        ctx.reduction = reduction
        if reduction == "none":
            # Gradients need the per-token upstream gradient: recomputed in the backward.
            ctx.save_for_backward(hidden, weight, bias, labels)
            ctx.setup = (options, softcap, chunk_size, backend, needs)
            loss, *_ = _chunked_pass(
                hidden, weight, bias, labels, None, one, options, softcap, chunk_size, backend,
                needs,
            )  # fmt: skip
            return loss
        valid = labels != options[2]
        # All rows ignored: the mean is 0 / 0 = nan like F.cross_entropy; gradients stay 0.
        scale = 1.0 / valid.sum().to(torch.float32) if reduction == "mean" else one
        loss, dhidden, dweight, dbias = _chunked_pass(
            hidden, weight, bias, labels, valid.float() if any(needs) else None,
            torch.nan_to_num(scale, posinf=0.0), options, softcap, chunk_size, backend, needs,
        )  # fmt: skip
        ctx.save_for_backward(dhidden, dweight, dbias)
        return loss.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            options, softcap, chunk_size, backend, needs = ctx.setup
            needs = tuple(n and g for n, g in zip(needs, ctx.needs_input_grad[:3]))
            one = torch.ones((), dtype=torch.float32, device=hidden.device)
            _, dhidden, dweight, dbias = _chunked_pass(
                hidden, weight, bias, labels, grad_loss.float().contiguous(), one, options,
                softcap, chunk_size, backend, needs,
            )  # fmt: skip
            return dhidden, dweight, dbias, None, None, None, None, None, None, None
        dhidden, dweight, dbias = ctx.saved_tensors
        # The upstream gradient of a training loss is exactly 1: skip weight-sized multiplies
        # (and their allocations). Under torch.compile the check would break the graph.
        if torch.compiler.is_compiling() or not bool(grad_loss == 1.0):
            dhidden, dweight, dbias = (
                None if g is None else g * grad_loss.to(g.dtype) for g in (dhidden, dweight, dbias)
            )
        return dhidden, dweight, dbias, None, None, None, None, None, None, None


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
    out_shape = labels.shape if isinstance(labels, torch.Tensor) else None
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (..., hidden_dim) -> (tokens, hidden_dim)
    labels = labels.reshape(-1) if isinstance(labels, torch.Tensor) else labels
    check_cross_entropy_inputs(
        hidden, labels, label_smoothing, ignore_index, reduction, lse_square_scale, "hidden"
    )
    vocab = weight.shape[0]
    check_labels_in_range(labels, vocab, ignore_index)
    backend = resolve_backend(backend, hidden.device, hidden.dtype)
    if backend == "triton" and hidden.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"hidden must be one of {KERNEL_DTYPES} for backend='triton', got {hidden.dtype}"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], vocab, hidden.shape[1])
    options = (float(label_smoothing), float(lse_square_scale), int(ignore_index))
    labels = labels.long().contiguous()
    loss = LinearCrossEntropyFunction.apply(
        hidden, weight, bias, labels, options, softcap, reduction, chunk_size, backend,
        torch.is_grad_enabled(),
    )  # fmt: skip
    return loss.reshape(out_shape) if reduction == "none" else loss


class LinearCrossEntropyLoss(CrossEntropyOptions):
    """LM head + cross-entropy in chunks; see :func:`linear_cross_entropy`.

    forward(hidden (..., hidden_dim), weight (vocab, hidden_dim), labels (...), bias=None)
    -> fp32 scalar, or per-token losses for reduction="none". The weight is passed in (not
    owned) so it can stay tied to the embedding of the model that calls this.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0,
                 lse_square_scale: float = 0.0, reduction: str = "mean",
                 chunk_size: int | None = None, backend: str | None = None,
                 softcap: float = 0.0):  # fmt: skip
        super().__init__(ignore_index, label_smoothing, lse_square_scale, reduction, backend)
        self.chunk_size, self.softcap = chunk_size, softcap

    def forward(self, hidden, weight, labels, bias=None):
        return linear_cross_entropy(
            hidden, weight, labels, bias, self.ignore_index, self.label_smoothing,
            self.lse_square_scale, self.reduction, self.chunk_size, self.softcap,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, softcap={self.softcap}"
