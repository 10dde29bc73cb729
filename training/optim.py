"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; biases, norm weights and embeddings do not.

    Embeddings are found by module type (``nn.Embedding``), so a tied lm_head weight, being
    the token embedding, does not decay either. Every parameter appears once.
    """
    no_decay = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay_params, other_params, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.dim() < 2 or id(param) in no_decay:
            other_params.append(param)
        else:
            decay_params.append(param)
    return [
        {"params": decay_params, "weight_decay": weight_decay},
        {"params": other_params, "weight_decay": 0.0},
    ]


def lr_lambda(
    step: int, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float
) -> float:
    """Multiplier of the peak learning rate at an optimizer step.

    Linear warmup from 1 / (warmup_steps + 1) to 1 over warmup_steps, then "cosine" or
    "linear" decay to min_lr_ratio at total_steps (held after), or "constant".
    """
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"scheduler.decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas, eps: float, fused: bool | None
):
    """AdamW over :func:`param_groups`; fused=None: fused on CUDA. The arguments are the keys
    of ``configs/optimizer/*.yaml``, which hold their defaults."""
    if lr <= 0:
        raise ValueError(f"optimizer.lr must be > 0, got {lr}")
    on_cuda = next(model.parameters()).is_cuda
    kwargs = {"fused": True} if (fused is None and on_cuda) or fused else {}
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **kwargs
    )


def _uses_fraction(warmup_fraction: float | None) -> bool:
    return 0 < float(warmup_fraction or 0) < 1


def warmup_length(total_steps: int, warmup_steps: int, warmup_fraction: float | None) -> int:
    """Optimizer steps of the warmup: warmup_fraction of total_steps when it is in (0, 1),
    else warmup_steps."""
    if _uses_fraction(warmup_fraction):
        return int(float(warmup_fraction) * total_steps)
    return int(warmup_steps)


def warmup_problem(
    max_steps: int, total_steps: int, warmup_steps: int, warmup_fraction: float | None
) -> str | None:
    """What is wrong when the warmup does not end before the run's last step (max_steps), so
    the learning rate never reaches optimizer.lr; None when it does."""
    warmup = warmup_length(total_steps, warmup_steps, warmup_fraction)
    if warmup < max_steps:
        return None
    key, value = ("scheduler.warmup_steps", warmup_steps)
    if _uses_fraction(warmup_fraction):
        key, value = ("scheduler.warmup_fraction", warmup_fraction)
    peak = max_steps / (warmup + 1)  # lr_lambda at the last step, max_steps - 1
    return (
        f"{key}={value} warms the learning rate up over {warmup} optimizer steps, but "
        f"trainer.max_steps={max_steps} ends the run first: the learning rate peaks at "
        f"{peak:.0%} of optimizer.lr. Lower {key} (or raise trainer.max_steps)."
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    decay: str,
    warmup_steps: int,
    warmup_fraction: float | None,
    min_lr_ratio: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR of :func:`lr_lambda`. The arguments after total_steps are the keys of
    ``configs/scheduler/*.yaml``; warmup_fraction in (0, 1) overrides warmup_steps."""
    warmup_steps = warmup_length(total_steps, warmup_steps, warmup_fraction)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(step, int(warmup_steps), total_steps, decay, float(min_lr_ratio)),
    )
