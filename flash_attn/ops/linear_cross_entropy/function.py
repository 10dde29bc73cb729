"""The chunked LM head + cross-entropy behind autograd: :class:`LinearCrossEntropyFunction`.

Only one (chunk, vocab) block of logits lives at a time; on the triton backend each chunk goes
through the fused cross-entropy's launches (``flash_attn.ops.cross_entropy.function.
chunk_losses_``: kept per chunk shape, its custom ops under ``torch.compile``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flash_attn.ops.cross_entropy.function import chunk_losses_


def _loss_and_dlogits_(logits, labels, dloss, options, backend):
    """Per-row loss (chunk,) fp32 of a chunk of logits (chunk, vocab).

    ``logits`` is overwritten: with the gradient dloss * dloss_row/dx in its own dtype when
    ``dloss`` (chunk,) fp32, the upstream gradient of each row's loss, is given; with scratch
    values otherwise (torch backend).
    """
    if backend == "triton":
        return chunk_losses_(logits, labels, dloss, options)
    label_smoothing, lse_square_scale, ignore_index = options
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


def _chunked_pass(
    hidden, weight, bias, labels, dloss, scale, options, softcap, chunk_size, backend, needs
):
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
        ctx,
        hidden,
        weight,
        bias,
        labels,
        options,
        softcap,
        reduction,
        chunk_size,
        backend,
        grad_enabled,
    ):
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
                hidden,
                weight,
                bias,
                labels,
                None,
                one,
                options,
                softcap,
                chunk_size,
                backend,
                needs,
            )
            return loss
        valid = labels != options[2]
        # All rows ignored: the mean is 0 / 0 = nan like F.cross_entropy; gradients stay 0.
        scale = 1.0 / valid.sum().to(torch.float32) if reduction == "mean" else one
        loss, dhidden, dweight, dbias = _chunked_pass(
            hidden,
            weight,
            bias,
            labels,
            # Ignored rows get no gradient from the kernels / where below: every row's dloss
            # is 1, one value broadcast (stride 0).
            one.expand(labels.shape[0]) if any(needs) else None,
            torch.nan_to_num(scale, posinf=0.0),
            options,
            softcap,
            chunk_size,
            backend,
            needs,
        )
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
                hidden,
                weight,
                bias,
                labels,
                grad_loss.float().contiguous(),
                one,
                options,
                softcap,
                chunk_size,
                backend,
                needs,
            )
            return dhidden, dweight, dbias, None, None, None, None, None, None, None
        dhidden, dweight, dbias = ctx.saved_tensors
        # The upstream gradient of a training loss is exactly 1: skip weight-sized multiplies
        # (and their allocations). Under torch.compile the check would break the graph.
        if torch.compiler.is_compiling() or not bool(grad_loss == 1.0):
            dhidden, dweight, dbias = (
                None if g is None else g * grad_loss.to(g.dtype) for g in (dhidden, dweight, dbias)
            )
        return dhidden, dweight, dbias, None, None, None, None, None, None, None
