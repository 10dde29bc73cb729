"""Llama 2 / 3 (GQA, rope scaling) and Mistral (sliding window) <-> GPTLMHeadModel.

q, k, v projections are stacked into ``Wqkv`` and [up, gate] into the gated MLP's ``fc1``.
Hugging Face Llama checkpoints already use the rotate-half (GPT-NeoX) rotary layout, so no
permutation is needed.
"""

from __future__ import annotations

from flash_attn.models.hf_common import (
    SAVABLE_ACTIVATIONS,
    activation_from_hf,
    activation_to_hf,
    check_architecture,
    concat_rows,
    decoder_named_fields,
    decoder_named_fields_to_hf,
    rope_to_hf,
    rotary_fields,
    split_rows,
    weight_map,
)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# Hugging Face module names, in the order of ours (see weight_map); qkv_proj and
# up_gate_proj are made by from_hf_layout.
WEIGHT_MAP = weight_map(
    top=("model.embed_tokens", None, "model.norm", "lm_head"),
    layer="model.layers.{}.",
    attention=("input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj"),
    mlp=("post_attention_layernorm", "mlp.up_gate_proj", "mlp.down_proj"),
)
IGNORE = (r"rotary_emb\.inv_freq$",)
_QKV = ("q_proj", "k_proj", "v_proj")
_UP_GATE = ("up_proj", "gate_proj")


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from a Llama / Mistral config.json dict."""
    fields = decoder_named_fields(hf)
    n_embd, n_head = fields["n_embd"], fields["n_head"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise ValueError(
            f"head_dim {head_dim} * heads {n_head} != hidden_size {n_embd}: unsupported"
        )
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return dict(
        fields,
        **rotary_fields(hf),
        n_positions=hf.get("max_position_embeddings", 2048),
        n_head_kv=hf.get("num_key_value_heads") or n_head,
        n_inner=hf["intermediate_size"],
        activation=activation_from_hf(hf.get("hidden_act", "silu"), "hidden_act"),
        gated_mlp=True,
        norm_type="rmsnorm",
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        qkv_proj_bias=attention_bias,
        out_proj_bias=attention_bias,
        mlp_fc1_bias=mlp_bias,
        mlp_fc2_bias=mlp_bias,
        sliding_window=window,
        initializer_range=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def from_hf_layout(state_dict: dict, fields: dict) -> dict:
    """q/k/v_proj -> qkv_proj (rows [q; k; v]); up/gate_proj -> up_gate_proj (rows [up; gate])."""
    return concat_rows(concat_rows(state_dict, _QKV, "qkv_proj"), _UP_GATE, "up_gate_proj")


def config_to_hf(config) -> dict:
    """A Llama (or Mistral, with a sliding window) config.json dict; ValueError naming the
    fields Llama cannot hold."""
    check_architecture(
        config,
        "Llama",
        norm_type="rmsnorm",
        gated_mlp=True,
        parallel_block=False,
        rotary_emb_interleaved=False,
        lm_head_bias=False,
        activation=SAVABLE_ACTIVATIONS,
        rotary_emb_dim=range(2, config.head_dim + 1),
    )
    mistral = config.sliding_window is not None
    out = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        **decoder_named_fields_to_hf(config),
        "intermediate_size": config.n_inner or 4 * config.n_embd,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": activation_to_hf(config.activation, tanh_gelu="gelu_pytorch_tanh"),
        "rms_norm_eps": config.layer_norm_epsilon,
        **rope_to_hf(config),
        "initializer_range": config.initializer_range,
    }
    if mistral:
        out["sliding_window"] = config.sliding_window
    else:
        out["attention_bias"] = config.qkv_proj_bias
        out["mlp_bias"] = config.mlp_fc1_bias
    return out


def to_hf_layout(state_dict: dict, config) -> dict:
    """Weights under Llama names: qkv_proj and up_gate_proj split back into their projections."""
    q_rows, kv_rows = config.n_embd, config.kv_heads * config.head_dim
    out = split_rows(state_dict, "qkv_proj", _QKV, [q_rows, kv_rows, kv_rows])
    return split_rows(out, "up_gate_proj", _UP_GATE)
