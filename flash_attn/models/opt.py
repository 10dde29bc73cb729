"""OPT (``OPTForCausalLM``, pre-norm sizes) <-> GPTLMHeadModel.

OPT's learned positions start at row 2 of ``embed_positions`` (rows 0 and 1 are a legacy
offset, never read), so those rows are dropped on the way in and written as zeros on the way
out. The post-norm OPT-350m layout (``do_layer_norm_before`` false, ``word_embed_proj_dim`` !=
hidden) is rejected.
"""

from __future__ import annotations

import torch

import flash_attn.models.hf_common as common

ARCHITECTURES = ("OPTForCausalLM",)

# Hugging Face module names, in the order of ours (see weight_map); qkv_proj is made by
# from_hf_layout.
WEIGHT_MAP = common.weight_map(
    top=(
        "model.decoder.embed_tokens",
        "model.decoder.embed_positions",
        "model.decoder.final_layer_norm",
        "lm_head",
    ),
    layer="model.decoder.layers.{}.",
    attention=("self_attn_layer_norm", "self_attn.qkv_proj", "self_attn.out_proj"),
    mlp=("final_layer_norm", "fc1", "fc2"),
)
_POSITION_OFFSET = 2
_QKV = ("q_proj", "k_proj", "v_proj")
_POSITIONS = "model.decoder.embed_positions.weight"


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from an OPT config.json dict."""
    hidden = hf["hidden_size"]
    if not hf.get("do_layer_norm_before", True) or hf.get("word_embed_proj_dim", hidden) != hidden:
        raise ValueError(
            "OPT with do_layer_norm_before=False or word_embed_proj_dim != hidden_size "
            "(opt-350m) is not supported"
        )
    bias = hf.get("enable_bias", True)
    return dict(
        common.decoder_named_fields(hf),
        n_positions=hf["max_position_embeddings"],
        n_inner=hf["ffn_dim"],
        activation=common.activation_from_hf(
            hf.get("activation_function", "relu"), "activation_function"
        ),
        qkv_proj_bias=bias,
        out_proj_bias=bias,
        mlp_fc1_bias=bias,
        mlp_fc2_bias=bias,
        resid_pdrop=hf.get("dropout", 0.0),
        embd_pdrop=hf.get("dropout", 0.0),
        initializer_range=hf.get("init_std", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def from_hf_layout(state_dict: dict, fields: dict) -> dict:
    """The ``model.`` prefix of bare OPTModel checkpoints, the position offset rows dropped,
    q/k/v_proj -> qkv_proj (rows [q; k; v])."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("decoder."):  # bare OPTModel checkpoints
            key = "model." + key
        out[key] = tensor
    positions = out.get(_POSITIONS)
    if positions is not None:
        out[_POSITIONS] = positions[_POSITION_OFFSET:]
    return common.concat_rows(out, _QKV, "qkv_proj")


def config_to_hf(config) -> dict:
    """An OPT config.json dict; ValueError naming the fields OPT cannot hold."""
    bias = config.qkv_proj_bias
    common.check_architecture(
        config,
        "OPT",
        norm_type="layernorm",
        rotary_emb_dim=0,
        n_positions=range(1, 1 << 31),
        parallel_block=False,
        gated_mlp=False,
        kv_heads=config.n_head,
        out_proj_bias=bias,
        mlp_fc1_bias=bias,
        mlp_fc2_bias=bias,
        lm_head_bias=False,
        embd_pdrop=config.resid_pdrop,
        activation=common.SAVABLE_ACTIVATIONS,
    )
    return {
        "architectures": list(ARCHITECTURES),
        "model_type": "opt",
        **common.decoder_named_fields_to_hf(config),
        "ffn_dim": config.n_inner or 4 * config.n_embd,
        "word_embed_proj_dim": config.n_embd,
        "activation_function": common.activation_to_hf(config.activation),
        "do_layer_norm_before": True,
        "enable_bias": bias,
        "dropout": config.resid_pdrop,
        "layerdrop": 0.0,
        "init_std": config.initializer_range,
    }


def to_hf_layout(state_dict: dict, config) -> dict:
    """qkv_proj split into q/k/v_proj; the position offset rows put back (as zeros)."""
    out = common.split_rows(state_dict, "qkv_proj", _QKV)
    positions = out[_POSITIONS]
    offset_rows = positions.new_zeros(_POSITION_OFFSET, positions.shape[1])
    out[_POSITIONS] = torch.cat([offset_rows, positions])
    return out
