"""Autoregressive decoding with a KV cache: prefill the prompt once, then one token per step.

``InferenceParams`` carries the per-layer caches through the model; each
:class:`~flash_attn.modules.mha.MHA` appends its new keys and values at ``seqlen_offset`` and
attends to everything cached with ``flash_attn_with_kvcache``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flash_attn.utils.checks import check_float, check_int


@dataclass
class InferenceParams:
    """State of one decoding run.

    Attributes:
        max_seqlen: cache length (prompt + new tokens).
        max_batch_size: cache rows.
        seqlen_offset: tokens already in the cache (all rows alike); the next forward writes
            at this position.
        batch_size_offset: first cache row used by the current batch.
        key_value_memory_dict: layer_idx -> (k_cache, v_cache), each
            (max_batch_size, max_seqlen, nheads_kv, headdim), allocated by the layers on first use.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        """Start a new run reusing the allocated caches when they are large enough."""
        self.seqlen_offset = 0
        if max_seqlen > self.max_seqlen or max_batch_size > self.max_batch_size:
            self.key_value_memory_dict.clear()
        self.max_seqlen, self.max_batch_size = max_seqlen, max_batch_size


def check_sampling(temperature, top_k, top_p) -> None:
    """TypeError/ValueError naming temperature (finite, >= 0), top_k (integer >= 0) or top_p
    (in (0, 1]) when it is not what :func:`sample` takes."""
    check_float("temperature", temperature, low=0.0)
    check_int("top_k", top_k, minimum=0)
    check_float("top_p", top_p, low=0.0, high=1.0, low_open=True)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Next tokens from logits (batch, vocab): greedy when temperature == 0 or top_k == 1,
    else softmax(logits / temperature) restricted to the top_k tokens and to the smallest set
    whose probability reaches top_p. Returns (batch,) int64."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        top_k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(-1)


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Extend every prompt by up to max_new_tokens sampled tokens.

    Args:
        model: a :class:`~flash_attn.models.gpt.GPTLMHeadModel` (forward takes
            ``inference_params`` and ``num_last_tokens``).
        input_ids: (batch, prompt_len) int64, prompts of equal length (no padding).
        max_new_tokens: >= 1.
        temperature, top_k, top_p: see :func:`sample` (top_k=1 is greedy).
        eos_token_id: rows that produced it stop; their later positions hold eos_token_id, and
            decoding ends when every row has stopped.
    Returns:
        (batch, prompt_len + n_new) int64, n_new <= max_new_tokens.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids must be (batch, prompt_len >= 1), got shape {tuple(input_ids.shape)}"
        )
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_sampling(temperature, top_k, top_p)
    check_int("eos_token_id", eos_token_id, minimum=0, optional=True)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if eos_token_id is not None and vocab is not None and eos_token_id >= vocab:
        raise ValueError(f"eos_token_id must be < vocab_size ({vocab}), got {eos_token_id}")
    batch, prompt_len = input_ids.shape
    params = InferenceParams(max_seqlen=prompt_len + max_new_tokens, max_batch_size=batch)
    was_training = model.training
    model.eval()
    try:
        tokens = [input_ids]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        step_input = input_ids
        for _ in range(max_new_tokens):
            logits = model(step_input, inference_params=params, num_last_tokens=1).logits
            params.seqlen_offset += step_input.shape[1]
            next_token = sample(logits[:, -1], temperature, top_k, top_p)  # (B,)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            tokens.append(next_token[:, None])
            if eos_token_id is not None and bool(finished.all()):
                break
            step_input = next_token[:, None]  # (B,) -> (B, 1)
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)
