"""Our kernels inside unmodified transformers models.

    import flash_attn.integrations.transformers as fa  # registers "flash_attn_triton"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flash_attn_triton")
    model = fa.apply_fused_ops(model)  # norms, rotary, MLP and loss of this instance

The attention goes through transformers' own flash-attention path (padding masks unpadded into
the varlen kernel, packed batches' position_ids turned into cu_seqlens, sliding window, softcap)
with our functions in place of the flash-attn package's. ``apply_fused_ops`` changes module
instances only: norms become our norm modules holding the same parameters, and the attention,
MLP and causal-LM modules get an instance ``forward`` from ``hf_forwards``; no class attribute
of transformers is touched, and the state dict keeps its keys. Models using this attention
check the shape of position_ids before each forward (a pre-hook on the model instance).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from transformers import AttentionInterface, PreTrainedModel
from transformers import modeling_flash_attention_utils as hf_flash
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.pytorch_utils import Conv1D

from flash_attn.bert_padding import pad_input, unpad_input
from flash_attn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from flash_attn.integrations import hf_forwards
from flash_attn.models.hf_common import HF_ACTIVATIONS as ACTIVATIONS  # transformers' names -> ours
from flash_attn.modules.norm import LayerNorm, RMSNorm

ATTENTION_NAME = "flash_attn_triton"


def _varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
    """flash_attn_varlen_func taking transformers' lengths: max_seqlen as 0-d tensors, int64 cu."""
    cu_q, cu_k = (cu.to(torch.int32) for cu in (cu_seqlens_q, cu_seqlens_k))
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _install_flash_functions() -> None:
    """Make transformers' flash-attention path call our functions.

    transformers treats every attn_implementation whose name contains "flash" as a flash-attn
    build: it resolves its functions through lazy_import_flash_attention, which caches one
    implementation in module globals, when a model is built and in every attention call. Its
    fallback looks for a Hub kernel, so an unknown local name fails; we fill that cache instead.
    """
    if hf_flash._loaded_implementation == ATTENTION_NAME:
        return
    hf_flash._flash_fn, hf_flash._flash_varlen_fn = flash_attn_func, _varlen_func
    hf_flash._flash_with_kvcache_fn = flash_attn_with_kvcache
    hf_flash._pad_fn, hf_flash._unpad_fn = pad_input, unpad_input
    define = hf_flash._lazy_define_process_function
    hf_flash._process_flash_kwargs_fn = define(flash_attn_varlen_func)
    hf_flash._process_with_kvcache_kwargs_fn = define(flash_attn_with_kvcache)
    hf_flash._loaded_implementation = ATTENTION_NAME


def flash_attn_triton_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function "flash_attn_triton".

    Args:
        module: the calling attention module (its config, is_causal, layer_idx).
        query: (B, H, T_q, D); key, value: (B, H_kv, T_k, D).
        attention_mask: (B, T_k) bool padding mask, None (no padding), or a custom 4-D mask
            as eager takes it (see :func:`_attend_with_4d_mask`).
        kwargs: dropout, scaling, sliding_window, softcap, position_ids, cu_seq_lens_q/k, ...
    Returns:
        ((B, T_q, H, D) attention output, None).
    """
    _install_flash_functions()
    # transformers' own wrapper (integrations.flash_attention) casts fp32 inputs to half
    # precision, which flash-attn needs and ours does not.
    # (B, H, T, D) -> (B, T, H, D)
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    dropout, scaling = kwargs.pop("dropout", 0.0), kwargs.pop("scaling", None)
    if attention_mask is not None and attention_mask.dim() == 4:
        out = _attend_with_4d_mask(query, key, value, attention_mask, dropout, scaling, kwargs)
        return out, None
    _check_packed_position_ids(kwargs.get("position_ids"), query, attention_mask)
    is_causal = kwargs.pop("is_causal", None)
    out = hf_flash._flash_attention_forward(
        query,
        key,
        value,
        attention_mask,
        query_length=query.shape[1],
        is_causal=module.is_causal if is_causal is None else is_causal,
        dropout=dropout,
        softmax_scale=scaling,
        attn_implementation=ATTENTION_NAME,
        **kwargs,
    )
    return out, None


def _attend_with_4d_mask(query, key, value, attention_mask, dropout, scaling, kwargs):
    """Attention under a custom 4-D mask, as eager: the mask replaces the causal and sliding
    masks; bool (True: attend) or additive float, (B or 1, H or 1, T_q, >= T_k) (eager reads
    its first T_k columns). query (B, T_q, H, D); returns (B, T_q, H, D)."""
    batch, q_len, heads = query.shape[:3]
    kv_len = key.shape[1]
    if not (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()):
        raise TypeError(
            "a 4-D attention_mask must be bool (True where attention is allowed) or float "
            f"(added to the scores), got {attention_mask.dtype}"
        )
    b, h, rows, cols = attention_mask.shape
    if b not in (1, batch) or h not in (1, heads) or rows != q_len or cols < kv_len:
        raise ValueError(
            f"a 4-D attention_mask must have shape ({batch} or 1, {heads} or 1, {q_len}, "
            f">= {kv_len}) = (batch, heads, query length, key length), got "
            f"{tuple(attention_mask.shape)}"
        )
    bias = attention_mask[..., :kv_len]
    if bias.is_floating_point():
        bias = bias.to(query.dtype)
    softcap = kwargs.get("softcap") or 0.0
    return flash_attn_func(
        query, key, value, dropout, scaling, False, softcap=softcap, attn_bias=bias
    )


def _check_packed_position_ids(position_ids, query, attention_mask) -> None:
    """position_ids (B, T_q), and, where transformers reads them as packed sequences (batch 1,
    no attention_mask, positions that fall back), starting at 0: a sequence starts at every 0."""
    if position_ids is None:
        return
    expected = (query.shape[0], query.shape[1])
    if position_ids.dim() != 2 or position_ids.shape[-1] != expected[1]:
        raise ValueError(
            f"position_ids must have shape (batch, query length) = {expected}, got "
            f"{tuple(position_ids.shape)}"
        )
    if attention_mask is None and hf_flash._is_packed_sequence(position_ids, query.shape[0]):
        first = int(position_ids[0, 0])
        if first != 0 or bool((position_ids < 0).any()):
            raise ValueError(
                "position_ids of a packed batch (batch 1, no attention_mask) must restart at 0 "
                f"at the start of each sequence, the first included; got {first} first "
                f"({position_ids[0, :8].tolist()}...). Pass positions from 0, or an "
                "attention_mask"
            )


def _check_position_ids(model, args, kwargs, *, parameters, extra_dims):
    """Forward pre-hook of a model using our attention: position_ids (batch or 1, T) for T input
    tokens; with extra_dims (families outside FAMILIES, such as multimodal rotary's (3, B, T)),
    any leading dimensions. A wrong length would otherwise fail in transformers' rotary
    embedding, before the attention sees position_ids, with a size error that names neither.
    Shapes only: no device sync."""
    given = dict(zip(parameters, args)) if args else {}
    position_ids = kwargs.get("position_ids", given.get("position_ids"))
    if position_ids is None:
        return None
    source = "input_ids"
    tokens = kwargs.get(source, given.get(source))
    if tokens is None:
        source = "inputs_embeds"
        tokens = kwargs.get(source, given.get(source))
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        return None
    batch, seqlen = tokens.shape[:2]
    shape = tuple(position_ids.shape)
    rank_ok = len(shape) >= 2 if extra_dims else len(shape) == 2
    if not rank_ok or shape[-1] != seqlen or shape[-2] not in (1, batch):
        expected = f"({batch}, {seqlen})" + (f" or (1, {seqlen})" if batch != 1 else "")
        raise ValueError(
            f"position_ids must have shape (batch, sequence length) = {expected}, one position "
            f"per token of {source} {tuple(tokens.shape)}; got {shape}"
        )
    return None


def _add_position_ids_check(model: nn.Module) -> None:
    """Register :func:`_check_position_ids` on model, once, if its forward takes position_ids."""
    if not isinstance(model, PreTrainedModel):
        return
    parameters = tuple(inspect.signature(model.forward).parameters)
    hooks = model._forward_pre_hooks.values()
    if "position_ids" not in parameters or any(
        getattr(hook, "func", None) is _check_position_ids for hook in hooks
    ):
        return
    extra_dims = getattr(model.config, "model_type", None) not in FAMILIES
    hook = partial(_check_position_ids, parameters=parameters, extra_dims=extra_dims)
    model.register_forward_pre_hook(hook, with_kwargs=True)


def _check_position_ids_of_new_models(module, name, submodule) -> None:
    """Module-registration hook (global, called when a module gets a submodule): a transformers
    model built with attn_implementation="flash_attn_triton" gets the position_ids check.
    transformers hands the attention function nothing at construction; this is the first time
    our code sees the model. The check itself runs only on those models."""
    if isinstance(module, PreTrainedModel):
        implementation = getattr(module.config, "_attn_implementation", None)
        if implementation == ATTENTION_NAME:
            _add_position_ids_check(module)
    return None


def _padding_mask(*args, attention_mask=None, **kwargs):
    """transformers' flash-attention mask function, for the masks it can take: a 2-D
    (batch, seqlen) padding mask, or None (4-D masks reach the attention as they are)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "attention_mask must be a (batch, seqlen) padding mask (1 for tokens, 0 for "
            "padding) or a 4-D (batch, heads, query length, key length) mask, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    return flash_attention_mask(*args, attention_mask=attention_mask, **kwargs)


_registration_hook = None  # handle of _check_position_ids_of_new_models, once registered


def register() -> None:
    """Register "flash_attn_triton" with transformers' attention and mask interfaces.

    The mask function is transformers' flash-attention one: a 2D padding mask, or None; other
    masks than 2-D and 4-D are refused by name. Models built from now on with this attention
    check their position_ids' shape before each forward (:func:`_check_position_ids`).
    """
    global _registration_hook
    AttentionInterface.register(ATTENTION_NAME, flash_attn_triton_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)
    _install_flash_functions()
    if _registration_hook is None:
        _registration_hook = register_module_module_registration_hook(
            _check_position_ids_of_new_models
        )


@dataclass(frozen=True)
class MlpLayout:
    """An MLP module's layer names: (gate, up, down) when gated, else (fc1, fc2)."""

    names: tuple[str, ...]
    layer_type: type = nn.Linear  # transformers' Conv1D stores weights transposed
    dropout: str | None = None  # name of a dropout applied to the output


@dataclass(frozen=True)
class Family:
    """What apply_fused_ops patches in one model family; classes are matched by name."""

    backbone: str  # attribute of the causal-LM model holding the decoder
    lm_head: str
    norm_class: str
    norm: Callable[..., LayerNorm]  # our replacement: (hidden_size, eps=, bias=, device=)
    mlp_class: str
    mlp: MlpLayout
    activation_key: str  # config attribute naming the MLP activation
    attention_class: str | None  # None: no rotary to patch
    attention_forward: Callable | None


GATED = MlpLayout(("gate_proj", "up_proj", "down_proj"))


def _llama_like(prefix: str, norm: Callable[..., LayerNorm] = RMSNorm, activation_key="hidden_act"):
    return Family(
        "model",
        "lm_head",
        f"{prefix}RMSNorm",
        norm,
        f"{prefix}MLP",
        GATED,
        activation_key,
        f"{prefix}Attention",
        hf_forwards.llama_attention_forward,
    )


FAMILIES = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3"),
    # Gemma scales by (1 + weight)
    "gemma2": _llama_like(
        "Gemma2", partial(RMSNorm, zero_centered_weight=True), "hidden_activation"
    ),
    "gpt2": Family(
        "transformer",
        "lm_head",
        "LayerNorm",
        LayerNorm,
        "GPT2MLP",
        MlpLayout(("c_fc", "c_proj"), Conv1D, "dropout"),
        "activation_function",
        None,
        None,
    ),
    "gpt_neox": Family(
        "gpt_neox",
        "lm_head",
        "LayerNorm",
        LayerNorm,
        "GPTNeoXMLP",
        MlpLayout(("dense_h_to_4h", "dense_4h_to_h")),
        "hidden_act",
        "GPTNeoXAttention",
        hf_forwards.neox_attention_forward,
    ),
}


def _is_class(module: nn.Module, name: str) -> bool:
    """True for transformers' (or torch's) class `name`, never for our replacement of it."""
    return type(module).__name__ == name and not type(module).__module__.startswith("flash_attn")


def _fused_norm(old: nn.Module, kind: Callable[..., LayerNorm]) -> LayerNorm:
    """Our norm holding old's parameters (same objects, so optimizers and ties still see them)."""
    eps = getattr(old, "variance_epsilon", getattr(old, "eps", None))
    bias = getattr(old, "bias", None)
    new = kind(old.weight.shape[0], eps=eps, bias=bias is not None, device="meta")
    new.weight = old.weight
    if bias is not None:
        new.bias = bias
    return new.train(old.training)


def _check_norm(name: str, module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    shape = getattr(module, "normalized_shape", (None,))
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or len(shape) != 1:
        raise ValueError(f"cannot patch norm {name!r}: needs a (hidden,) weight, got {module}")


def _check_same_parameters(theirs: Callable, ours: Callable) -> None:
    """Our attention forward must take the arguments by the names this transformers uses
    (a cache passed under another name would be ignored without an error)."""
    names = [list(inspect.signature(f).parameters) for f in (theirs, ours)]
    if names[0] != names[1]:
        raise ValueError(
            f"rotary=True: {theirs.__qualname__} takes {names[0]} in this transformers version, "
            f"our replacement {names[1]}; pass rotary=False"
        )


def _plan(model: nn.Module, family: Family, config, attention, norm, rotary, mlp, loss):
    """Everything to change, checked before anything changes: (norm swaps, forward binds)."""
    swaps, binds = [], []
    if loss:
        head = getattr(model, family.lm_head, None)
        if getattr(model, family.backbone, None) is None or not isinstance(head, nn.Linear):
            raise ValueError(
                f"loss=True needs the causal-LM model ({type(model).__name__} has no "
                f"{family.backbone!r} and nn.Linear {family.lm_head!r}); pass loss=False"
            )
        names = dict(backbone=family.backbone, lm_head=family.lm_head)
        binds.append((model, partial(hf_forwards.causal_lm_forward, **names)))
    if mlp:
        act_name = getattr(config, family.activation_key, None)
        if act_name not in ACTIVATIONS:
            raise ValueError(
                f"mlp=True: activation {act_name!r} has no fused kernel (supported: "
                f"{sorted(ACTIVATIONS)}); pass mlp=False"
            )
        gated = len(family.mlp.names) == 3
        forward = hf_forwards.gated_mlp_forward if gated else hf_forwards.mlp_forward
        options = dict(names=family.mlp.names, activation=ACTIVATIONS[act_name])
        options["layer_type"] = family.mlp.layer_type
        if family.mlp.dropout:
            options["dropout"] = family.mlp.dropout
        for module in model.modules():
            if _is_class(module, family.mlp_class):
                binds.append((module, partial(forward, **options)))
    if rotary and family.attention_class is not None:
        for module in model.modules():
            if _is_class(module, family.attention_class):
                _check_same_parameters(type(module).forward, family.attention_forward)
                binds.append((module, family.attention_forward))
    if norm:
        for parent in model.modules():
            for name, child in parent.named_children():
                if _is_class(child, family.norm_class):
                    _check_norm(name, child)
                    swaps.append((parent, name, child))
    if attention and not model._supports_attention_backend:
        raise ValueError(f"attention=True: {type(model).__name__} has no attention interface")
    return swaps, binds


def apply_fused_ops(
    model: nn.Module,
    *,
    attention: bool = True,
    norm: bool = True,
    rotary: bool = True,
    mlp: bool = True,
    loss: bool = True,
) -> nn.Module:
    """Patch a loaded transformers model in place with our fused ops; return it.

    Args:
        model: a causal-LM model (e.g. LlamaForCausalLM) of a family in ``FAMILIES``: Llama,
            Mistral, Qwen2, Qwen3, Gemma 2, GPT-2, GPT-NeoX. Its base model (LlamaModel)
            works with loss=False.
        attention: set the model's attention to "flash_attn_triton".
        norm: RMSNorm / LayerNorm modules -> ours (same parameters).
        rotary: rotary embeddings applied by our rotary op (families with rotary).
        mlp: SwiGLU / GeGLU / GELU MLPs -> our fused MLP (same nn.Linear weights).
        loss: with labels, the loss comes from the hidden states by linear cross-entropy and
            the (B, T, vocab) logits are never built (the output's logits are None); without
            labels the logits are returned as before.
    Returns:
        model, patched. Its state dict keys, save_pretrained and PEFT adapters are unchanged.
        Its forward checks the shape of position_ids (:func:`_check_position_ids`).
    Raises:
        ValueError: unsupported family, or a part that cannot be patched (nothing is changed).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"apply_fused_ops supports the model types {sorted(FAMILIES)}, got {model_type!r} "
            f"({type(model).__name__})"
        )
    family = FAMILIES[model_type]
    swaps, binds = _plan(model, family, config, attention, norm, rotary, mlp, loss)
    if attention:
        model.set_attn_implementation(ATTENTION_NAME)
    for module in model.modules():
        _add_position_ids_check(module)
    for parent, name, old in swaps:
        setattr(parent, name, _fused_norm(old, family.norm))
    for module, forward in binds:
        bound = partial(forward, module)
        # Trainer and PEFT read forward's signature (which columns to keep, loss kwargs).
        bound.__signature__ = inspect.signature(module.forward)
        module.forward = bound
    return model


register()
