"""Llama 2 / 3 (GQA, rope scaling) and Mistral (sliding window) <-> GPTLMHeadModel.

q, k, v projections are stacked into ``Wqkv`` and [up, gate] into the gated MLP's ``fc1``.
Hugging Face Llama checkpoints already use the rotate-half (GPT-NeoX) rotary layout, so no
permutation is needed.
"""

from __future__ import annotations

import torch

from flash_attn.models.hf_checkpoint import invert, rename_weights

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

_LAYER = "model.layers.{}."
_OURS = "transformer.h.{}."
WEIGHT_MAP = {
    "model.embed_tokens.weight": "transformer.embeddings.wte.weight",
    _LAYER + "input_layernorm.weight": _OURS + "ln_1.weight",
    _LAYER + "self_attn.qkv_proj.weight": _OURS + "attn.Wqkv.weight",  # made by merge_hf
    _LAYER + "self_attn.qkv_proj.bias": _OURS + "attn.Wqkv.bias",
    _LAYER + "self_attn.o_proj.weight": _OURS + "attn.out_proj.weight",
    _LAYER + "self_attn.o_proj.bias": _OURS + "attn.out_proj.bias",
    _LAYER + "post_attention_layernorm.weight": _OURS + "ln_2.weight",
    _LAYER + "mlp.up_gate_proj.weight": _OURS + "mlp.fc1.weight",  # made by merge_hf
    _LAYER + "mlp.up_gate_proj.bias": _OURS + "mlp.fc1.bias",
    _LAYER + "mlp.down_proj.weight": _OURS + "mlp.fc2.weight",
    _LAYER + "mlp.down_proj.bias": _OURS + "mlp.fc2.bias",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
IGNORE = (r"rotary_emb\.inv_freq$",)
_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_approx"}


def rope_settings(hf: dict) -> tuple[float, dict | None, float]:
    """(theta, scaling dict or None, partial_rotary_factor) from either config style:
    ``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    fraction = hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return float(theta), (dict(scaling) if rope_type != "default" else None), float(fraction)


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from a Llama / Mistral config.json dict."""
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise ValueError(
            f"head_dim {head_dim} * heads {n_head} != hidden_size {n_embd}: unsupported"
        )
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported; use one of {list(_ACTIVATIONS)}")
    theta, scaling, fraction = rope_settings(hf)
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return dict(
        vocab_size=hf["vocab_size"],
        n_positions=hf.get("max_position_embeddings", 2048),
        n_embd=n_embd,
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_head_kv=hf.get("num_key_value_heads") or n_head,
        n_inner=hf["intermediate_size"],
        activation=_ACTIVATIONS[act],
        gated_mlp=True,
        norm_type="rmsnorm",
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        qkv_proj_bias=attention_bias,
        out_proj_bias=attention_bias,
        mlp_fc1_bias=mlp_bias,
        mlp_fc2_bias=mlp_bias,
        rotary_emb_fraction=fraction,
        rotary_emb_base=theta,
        rotary_emb_scaling=scaling,
        sliding_window=window,
        attn_pdrop=hf.get("attention_dropout", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def merge_hf(state_dict: dict, config) -> dict:
    """q/k/v_proj -> qkv_proj (rows [q; k; v]); up/gate_proj -> up_gate_proj (rows [up; gate])."""
    out = dict(state_dict)
    for i in range(config.n_layer):
        prefix = _LAYER.format(i)
        for suffix in ("weight", "bias"):
            names = [f"{prefix}self_attn.{p}_proj.{suffix}" for p in "qkv"]
            if all(n in out for n in names):
                out[f"{prefix}self_attn.qkv_proj.{suffix}"] = torch.cat([out.pop(n) for n in names])
            names = [f"{prefix}mlp.{p}_proj.{suffix}" for p in ("up", "gate")]
            if all(n in out for n in names):
                out[f"{prefix}mlp.up_gate_proj.{suffix}"] = torch.cat([out.pop(n) for n in names])
    return out


def config_to_hf(config) -> dict:
    """A Llama (or Mistral, with a sliding window) config.json dict."""
    if config.norm_type != "rmsnorm" or not config.gated_mlp or config.rotary_emb_dim == 0:
        raise ValueError("this model is not a Llama architecture; it cannot be saved as Llama")
    if config.parallel_block or config.rotary_emb_interleaved or config.lm_head_bias:
        raise ValueError("this model is not a Llama architecture; it cannot be saved as Llama")
    act = {v: k for k, v in _ACTIVATIONS.items()}[config.activation]
    mistral = config.sliding_window is not None
    rope = {"rope_theta": config.rotary_emb_base, "rope_type": "default"}
    if config.rotary_emb_scaling:
        rope = {**config.rotary_emb_scaling, "rope_theta": config.rotary_emb_base}
    out = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.n_positions,
        "hidden_size": config.n_embd,
        "intermediate_size": config.n_inner or 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": act,
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_theta": config.rotary_emb_base,
        "rope_scaling": config.rotary_emb_scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
    }
    if config.rotary_emb_fraction != 1.0:
        out["partial_rotary_factor"] = config.rotary_emb_fraction
        rope["partial_rotary_factor"] = config.rotary_emb_fraction
    if mistral:
        out["sliding_window"] = config.sliding_window
    else:
        out["attention_bias"] = config.qkv_proj_bias
        out["mlp_bias"] = config.mlp_fc1_bias
    return out


def state_dict_to_hf(state_dict: dict, config) -> dict:
    """Our state dict -> Llama keys, Wqkv and fc1 split back into their projections."""
    out, unexpected = rename_weights(state_dict, invert(WEIGHT_MAP))
    if unexpected:
        raise ValueError(f"weights with no Llama name: {unexpected}")
    q_dim, kv_dim = config.n_embd, config.kv_heads * config.head_dim
    for i in range(config.n_layer):
        prefix = _LAYER.format(i)
        for suffix in ("weight", "bias"):
            qkv = out.pop(f"{prefix}self_attn.qkv_proj.{suffix}", None)
            if qkv is not None:
                for p, t in zip("qkv", qkv.split([q_dim, kv_dim, kv_dim])):
                    out[f"{prefix}self_attn.{p}_proj.{suffix}"] = t
            up_gate = out.pop(f"{prefix}mlp.up_gate_proj.{suffix}", None)
            if up_gate is not None:
                up, gate = up_gate.chunk(2)
                out[f"{prefix}mlp.up_proj.{suffix}"] = up
                out[f"{prefix}mlp.gate_proj.{suffix}"] = gate
    return out
