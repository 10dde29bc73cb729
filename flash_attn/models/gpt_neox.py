"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) <-> GPTLMHeadModel.

GPT-NeoX packs q, k, v per head: ``query_key_value`` rows are (heads, 3, head_dim); they are
reordered to our (3, heads, head_dim). Parallel residual by default, two norms, partial rotary.
"""

from __future__ import annotations

from flash_attn.models.hf_common import (
    SAVABLE_ACTIVATIONS,
    activation_from_hf,
    activation_to_hf,
    check_architecture,
    decoder_named_fields,
    decoder_named_fields_to_hf,
    rope_to_hf,
    rotary_fields,
    weight_map,
)

ARCHITECTURES = ("GPTNeoXForCausalLM",)

# Hugging Face module names, in the order of ours (see weight_map).
WEIGHT_MAP = weight_map(
    top=("gpt_neox.embed_in", None, "gpt_neox.final_layer_norm", "embed_out"),
    layer="gpt_neox.layers.{}.",
    attention=("input_layernorm", "attention.query_key_value", "attention.dense"),
    mlp=("post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
)
IGNORE = (r"rotary_emb\.inv_freq$", r"attention\.bias$", r"attention\.masked_bias$")


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from a GPT-NeoX config.json dict."""
    rotary = rotary_fields(hf)
    # Older GPT-NeoX configs name the rope settings their own way.
    rotary["rotary_emb_base"] = hf.get("rotary_emb_base", rotary["rotary_emb_base"])
    rotary["rotary_emb_fraction"] = hf.get("rotary_pct", rotary["rotary_emb_fraction"])
    bias = hf.get("attention_bias", True)
    return dict(
        decoder_named_fields(hf),
        **rotary,
        n_positions=hf.get("max_position_embeddings", 2048),
        n_inner=hf.get("intermediate_size"),
        activation=activation_from_hf(hf.get("hidden_act", "gelu"), "hidden_act"),
        layer_norm_epsilon=hf.get("layer_norm_eps", 1e-5),
        parallel_block=hf.get("use_parallel_residual", True),
        qkv_proj_bias=bias,
        out_proj_bias=bias,
        resid_pdrop=hf.get("hidden_dropout", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def _reorder_qkv(state_dict: dict, heads: int, to_hf: bool) -> dict:
    """query_key_value rows (heads, 3, head_dim) <-> (3, heads, head_dim)."""
    out = dict(state_dict)
    for key, tensor in state_dict.items():
        if ".attention.query_key_value." in key:
            rest = tensor.shape[1:]
            groups = (3, heads) if to_hf else (heads, 3)
            # (A * B * D, ...) -> (A, B, D, ...) -> (B, A, D, ...) -> (B * A * D, ...)
            out[key] = tensor.reshape(*groups, -1, *rest).transpose(0, 1).reshape(tensor.shape)
    return out


def from_hf_layout(state_dict: dict, fields: dict) -> dict:
    """query_key_value rows (heads, 3, head_dim) -> (3, heads, head_dim)."""
    return _reorder_qkv(state_dict, fields["n_head"], to_hf=False)


def config_to_hf(config) -> dict:
    """A GPT-NeoX config.json dict; ValueError naming the fields GPT-NeoX cannot hold."""
    check_architecture(
        config,
        "GPT-NeoX",
        norm_type="layernorm",
        rotary_emb_dim=range(2, config.head_dim + 1),
        rotary_emb_interleaved=False,
        gated_mlp=False,
        parallel_block_tied_norm=False,
        kv_heads=config.n_head,
        out_proj_bias=config.qkv_proj_bias,
        mlp_fc1_bias=True,
        mlp_fc2_bias=True,
        lm_head_bias=False,
        activation=SAVABLE_ACTIVATIONS,
    )
    rope = rope_to_hf(config)
    return {
        "architectures": list(ARCHITECTURES),
        "model_type": "gpt_neox",
        **decoder_named_fields_to_hf(config),
        "intermediate_size": config.n_inner or 4 * config.n_embd,
        "hidden_act": activation_to_hf(config.activation),
        "layer_norm_eps": config.layer_norm_epsilon,
        "use_parallel_residual": config.parallel_block,
        "attention_bias": config.qkv_proj_bias,
        "hidden_dropout": config.resid_pdrop,
        "initializer_range": config.initializer_range,
        **rope,
        # the names of transformers 4
        "rotary_pct": config.rotary_emb_fraction,
        "rotary_emb_base": config.rotary_emb_base,
    }


def to_hf_layout(state_dict: dict, config) -> dict:
    """query_key_value rows (3, heads, head_dim) -> (heads, 3, head_dim)."""
    return _reorder_qkv(state_dict, config.n_head, to_hf=True)
