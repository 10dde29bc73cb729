"""GPT-J (``GPTJForCausalLM``) <-> GPTLMHeadModel.

Parallel block with one norm shared by attention and MLP, interleaved (GPT-J) rotary on the
first ``rotary_dim`` features of each head, no attention biases, an LM head with a bias.
"""

from __future__ import annotations

from flash_attn.models.hf_common import (
    SAVABLE_ACTIVATIONS,
    activation_to_hf,
    check_architecture,
    concat_rows,
    gpt2_named_fields,
    gpt2_named_fields_to_hf,
    split_rows,
    weight_map,
)

ARCHITECTURES = ("GPTJForCausalLM",)

# Hugging Face module names, in the order of ours (see weight_map); qkv_proj is made by
# from_hf_layout.
WEIGHT_MAP = weight_map(
    top=("transformer.wte", None, "transformer.ln_f", "lm_head"),
    layer="transformer.h.{}.",
    attention=("ln_1", "attn.qkv_proj", "attn.out_proj"),
    mlp=(None, "mlp.fc_in", "mlp.fc_out"),
)
IGNORE = (r"\.attn\.bias$", r"\.attn\.masked_bias$", r"embed_positions$")
_QKV = ("q_proj", "k_proj", "v_proj")


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from a GPT-J config.json dict."""
    head_dim = hf["n_embd"] // hf["n_head"]
    rotary_dim = hf.get("rotary_dim") or head_dim
    return dict(
        gpt2_named_fields(hf),
        n_positions=hf.get("n_positions", 2048),
        parallel_block=True,
        parallel_block_tied_norm=True,
        qkv_proj_bias=False,
        out_proj_bias=False,
        lm_head_bias=True,
        rotary_emb_fraction=rotary_dim / head_dim,
        rotary_emb_interleaved=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def from_hf_layout(state_dict: dict, fields: dict) -> dict:
    """q/k/v_proj -> qkv_proj (rows [q; k; v])."""
    return concat_rows(state_dict, _QKV, "qkv_proj")


def config_to_hf(config) -> dict:
    """A GPT-J config.json dict; ValueError naming the fields GPT-J cannot hold."""
    check_architecture(
        config,
        "GPT-J",
        norm_type="layernorm",
        parallel_block=True,
        parallel_block_tied_norm=True,
        rotary_emb_interleaved=True,
        rotary_emb_dim=range(2, config.head_dim + 1),
        rotary_emb_base=10000.0,
        rotary_emb_scaling=None,
        gated_mlp=False,
        kv_heads=config.n_head,
        qkv_proj_bias=False,
        out_proj_bias=False,
        mlp_fc1_bias=True,
        mlp_fc2_bias=True,
        lm_head_bias=True,
        activation=SAVABLE_ACTIVATIONS,
    )
    return {
        "architectures": list(ARCHITECTURES),
        "model_type": "gptj",
        **gpt2_named_fields_to_hf(config, activation_to_hf(config.activation)),
        "rotary_dim": config.rotary_emb_dim,
    }


def to_hf_layout(state_dict: dict, config) -> dict:
    """qkv_proj split back into q/k/v_proj."""
    return split_rows(state_dict, "qkv_proj", _QKV)
