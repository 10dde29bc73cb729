"""GPT-2 (``GPT2LMHeadModel``) <-> GPTLMHeadModel: our names are GPT-2's, so the table is short.

GPT-2 stores its linear layers as ``Conv1D`` with (in, out) weights: they are transposed to the
``nn.Linear`` (out, in) layout on the way in and back on the way out.
"""

from __future__ import annotations

from flash_attn.models.hf_common import (
    SAVABLE_ACTIVATIONS,
    activation_to_hf,
    check_architecture,
    gpt2_named_fields,
    gpt2_named_fields_to_hf,
    weight_map,
)

ARCHITECTURES = ("GPT2LMHeadModel",)

# Hugging Face module names, in the order of ours (see weight_map).
WEIGHT_MAP = weight_map(
    top=("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"),
    layer="transformer.h.{}.",
    attention=("ln_1", "attn.c_attn", "attn.c_proj"),
    mlp=("ln_2", "mlp.c_fc", "mlp.c_proj"),
)
# Causal-mask buffers of older checkpoints.
IGNORE = (r"\.attn\.bias$", r"\.attn\.masked_bias$")
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from a GPT-2 config.json dict."""
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn unsupported")
    return dict(
        gpt2_named_fields(hf),
        n_positions=hf.get("n_positions", 1024),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def from_hf_layout(state_dict: dict, fields: dict) -> dict:
    """Add the ``transformer.`` prefix of bare GPT2Model checkpoints; Conv1D -> Linear layout."""
    out = {}
    for key, tensor in state_dict.items():
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = tensor.t() if key.endswith(_CONV1D) else tensor
    return out


def config_to_hf(config) -> dict:
    """A GPT-2 config.json dict; ValueError naming the fields GPT-2 cannot hold."""
    act = activation_to_hf(config.activation)
    check_architecture(
        config,
        "GPT-2",
        norm_type="layernorm",
        rotary_emb_dim=0,
        parallel_block=False,
        gated_mlp=False,
        kv_heads=config.n_head,
        activation=SAVABLE_ACTIVATIONS,
        qkv_proj_bias=True,
        out_proj_bias=True,
        mlp_fc1_bias=True,
        mlp_fc2_bias=True,
        lm_head_bias=False,
    )
    return {
        "architectures": list(ARCHITECTURES),
        "model_type": "gpt2",
        **gpt2_named_fields_to_hf(config, act),
    }


def to_hf_layout(state_dict: dict, config) -> dict:
    """Weights under GPT-2 names in the Linear layout -> GPT-2's Conv1D layout."""
    return {k: v.t() if k.endswith(_CONV1D) else v for k, v in state_dict.items()}
