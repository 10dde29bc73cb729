"""Forwards that :func:`flash_attn.integrations.transformers.apply_fused_ops` binds to the module
instances of a loaded transformers model (``module.forward = partial(fn, module, ...)``), and
the Gemma norm it swaps in.

Each reads its parameters from the module's own submodules, so state-dict keys, PEFT adapters
and ``save_pretrained`` see the model unchanged. When a submodule it would read weights from has
been wrapped since (a PEFT LoRA layer, a quantized layer), it falls back to the class's forward.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from flash_attn.ops.linear_cross_entropy import linear_cross_entropy
from flash_attn.ops.mlp import fused_mlp
from flash_attn.ops.rotary import apply_rotary

IGNORE_INDEX = -100  # transformers' label for tokens without a loss


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by transformers' position embeddings cos, sin (B or 1, T, R).

    transformers repeats the R/2 angles twice; our op takes each once, one row per position.
    Flattening (B, T) into one sequence gives every token its own row, so any position_ids
    (left padding, packed sequences) rotate exactly as transformers does.
    """
    batch, seqlen = x.shape[:2]
    half = cos.shape[-1] // 2
    rows = (batch * seqlen, half)
    cos, sin = (t[..., :half].expand(batch, seqlen, half).reshape(rows) for t in (cos, sin))
    # (B, T, H, D) -> (1, B * T, H, D)
    return apply_rotary(x.reshape(1, batch * seqlen, *x.shape[2:]), cos, sin).view(x.shape)


def _attend(module: nn.Module, q, k, v, attention_mask, **kwargs):
    """q, k, v (B, H, T, D) -> (B, T, H * D) through the model's configured attention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)
    out, weights = interface(
        module,
        q,
        k,
        v,
        attention_mask,
        dropout=module.attention_dropout if module.training else 0.0,
        scaling=module.scaling,
        **kwargs,
    )
    return out.reshape(*out.shape[:2], -1).contiguous(), weights


def llama_attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs
):
    """Llama-style attention (Llama, Mistral, Qwen2, Qwen3, Gemma 2) with our rotary.

    hidden_states (B, T, C) -> ((B, T, C), attention weights or None).
    """
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)  # (B, T, H, D)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape)
    if hasattr(self, "q_norm"):  # Qwen3 normalises each head before the rotation
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = (_rotate(t, *position_embeddings) for t in (q, k))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D) -> (B, H, T, D)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    if window is not None:
        kwargs["sliding_window"] = window
    if getattr(self, "attn_logit_softcapping", None) is not None:
        kwargs["softcap"] = self.attn_logit_softcapping
    out, weights = _attend(self, q, k, v, attention_mask, **kwargs)
    return self.o_proj(out), weights


def neox_attention_forward(
    self, hidden_states, attention_mask=None, layer_past=None, position_embeddings=None, **kwargs
):
    """GPT-NeoX attention (fused qkv, partial rotary) with our rotary.

    hidden_states (B, T, C) -> ((B, T, C), attention weights or None).
    """
    shape = (*hidden_states.shape[:-1], -1, 3 * self.head_size)
    q, k, v = self.query_key_value(hidden_states).view(shape).chunk(3, dim=-1)  # (B, T, H, D)
    q, k = (_rotate(t, *position_embeddings) for t in (q, k))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D) -> (B, H, T, D)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)
    out, weights = _attend(self, q, k, v, attention_mask, **kwargs)
    return self.dense(out), weights


def _weight(layer: nn.Module, transposed: bool) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear, or of a transformers Conv1D (stored (in, out))."""
    return layer.weight.t() if transposed else layer.weight


def gated_mlp_forward(self, x, *, names, activation, layer_type):
    """down(act(gate(x)) * up(x)) in one fused op; names = (gate, up, down).

    x (..., C) -> (..., C).
    """
    gate, up, down = (getattr(self, name) for name in names)
    if any(type(layer) is not layer_type for layer in (gate, up, down)):
        return type(self).forward(self, x)
    fc1_weight = torch.cat([up.weight, gate.weight])  # (2 * hidden, C): our rows are [up; gate]
    fc1_bias = None if up.bias is None else torch.cat([up.bias, gate.bias])
    return fused_mlp(x, fc1_weight, fc1_bias, down.weight, down.bias, activation, gated=True)


def mlp_forward(self, x, *, names, activation, layer_type, dropout=None):
    """fc2(act(fc1(x))) in one fused op, then the module's dropout; names = (fc1, fc2).

    x (..., C) -> (..., C).
    """
    fc1, fc2 = (getattr(self, name) for name in names)
    if type(fc1) is not layer_type or type(fc2) is not layer_type:
        return type(self).forward(self, x)
    transposed = layer_type is not nn.Linear
    out = fused_mlp(
        x, _weight(fc1, transposed), fc1.bias, _weight(fc2, transposed), fc2.bias, activation
    )
    return getattr(self, dropout)(out) if dropout else out


def causal_lm_forward(
    self,
    *args,
    backbone,
    lm_head,
    labels=None,
    shift_labels=None,
    num_items_in_batch=None,
    **kwargs,
):
    """With labels: transformers' causal-LM loss from the hidden states by linear cross-entropy,
    never building the (B, T, vocab) logits (the output's logits are None). Without labels: the
    class's forward, logits included.

    labels (B, T) int64 with -100 for ignored tokens, shifted here as transformers does (or
    shift_labels (B, T) already shifted); num_items_in_batch: the loss is sum / it when given.
    A final_logit_softcapping in the config (Gemma 2) is applied inside the fused loss.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    head = getattr(self, lm_head)
    if (labels is None and shift_labels is None) or type(head) is not nn.Linear:
        given = dict(shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
        kwargs.update({key: value for key, value in given.items() if value is not None})
        return type(self).forward(self, *args, labels=labels, **kwargs)
    kwargs.pop("logits_to_keep", None)
    outputs = getattr(self, backbone)(*args, **kwargs)
    hidden = outputs.last_hidden_state  # (B, T, C)
    if shift_labels is None:  # token t predicts token t + 1
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    loss = linear_cross_entropy(
        hidden.to(head.weight.dtype),
        head.weight,
        shift_labels.to(hidden.device),
        head.bias,
        ignore_index=IGNORE_INDEX,
        reduction="mean" if num_items_in_batch is None else "sum",
        softcap=getattr(self.config, "final_logit_softcapping", None) or 0.0,
    )
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    fields = CausalLMOutputWithPast.__dataclass_fields__
    rest = {key: value for key, value in outputs.items() if key in fields}
    return CausalLMOutputWithPast(loss=loss, **rest)
