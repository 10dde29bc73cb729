"""The math of the optimizer and the schedule: AdamW parameter groups and the learning-rate
multiplier per step. :mod:`training.settings` builds the optimizer and scheduler from them."""

from __future__ import annotations

import math

from torch import nn

DECAYS = ("cosine", "linear", "constant")


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
    if decay not in DECAYS:
        raise ValueError(f"scheduler.decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
