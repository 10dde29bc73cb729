"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) -> GPTLMHeadModel.

GPT-NeoX packs q, k, v per head: ``query_key_value`` rows are (heads, 3, head_dim); they are
reordered to our (3, heads, head_dim). Parallel residual by default, two norms, partial rotary.
"""

from __future__ import annotations

from flash_attn.models.llama import rope_settings

ARCHITECTURES = ("GPTNeoXForCausalLM",)

_LAYER = "gpt_neox.layers.{}."
_OURS = "transformer.h.{}."
WEIGHT_MAP = {
    "gpt_neox.embed_in.weight": "transformer.embeddings.wte.weight",
    _LAYER + "input_layernorm.weight": _OURS + "ln_1.weight",
    _LAYER + "input_layernorm.bias": _OURS + "ln_1.bias",
    _LAYER + "post_attention_layernorm.weight": _OURS + "ln_2.weight",
    _LAYER + "post_attention_layernorm.bias": _OURS + "ln_2.bias",
    _LAYER + "attention.query_key_value.weight": _OURS + "attn.Wqkv.weight",
    _LAYER + "attention.query_key_value.bias": _OURS + "attn.Wqkv.bias",
    _LAYER + "attention.dense.weight": _OURS + "attn.out_proj.weight",
    _LAYER + "attention.dense.bias": _OURS + "attn.out_proj.bias",
    _LAYER + "mlp.dense_h_to_4h.weight": _OURS + "mlp.fc1.weight",
    _LAYER + "mlp.dense_h_to_4h.bias": _OURS + "mlp.fc1.bias",
    _LAYER + "mlp.dense_4h_to_h.weight": _OURS + "mlp.fc2.weight",
    _LAYER + "mlp.dense_4h_to_h.bias": _OURS + "mlp.fc2.bias",
    "gpt_neox.final_layer_norm.weight": "transformer.ln_f.weight",
    "gpt_neox.final_layer_norm.bias": "transformer.ln_f.bias",
    "embed_out.weight": "lm_head.weight",
}
IGNORE = (r"rotary_emb\.inv_freq$", r"attention\.bias$", r"attention\.masked_bias$")
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_approx", "gelu_fast": "gelu_approx",
                "gelu_pytorch_tanh": "gelu_approx", "relu": "relu"}  # fmt: skip


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from a GPT-NeoX config.json dict."""
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported; use one of {list(_ACTIVATIONS)}")
    theta, scaling, fraction = rope_settings(hf)
    theta = hf.get("rotary_emb_base", theta)
    fraction = hf.get("rotary_pct", fraction)
    bias = hf.get("attention_bias", True)
    return dict(
        vocab_size=hf["vocab_size"],
        n_positions=hf.get("max_position_embeddings", 2048),
        n_embd=hf["hidden_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_inner=hf.get("intermediate_size"),
        activation=_ACTIVATIONS[act],
        layer_norm_epsilon=hf.get("layer_norm_eps", 1e-5),
        parallel_block=hf.get("use_parallel_residual", True),
        qkv_proj_bias=bias,
        out_proj_bias=bias,
        rotary_emb_fraction=fraction,
        rotary_emb_base=theta,
        rotary_emb_scaling=scaling,
        attn_pdrop=hf.get("attention_dropout", 0.0),
        resid_pdrop=hf.get("hidden_dropout", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def merge_hf(state_dict: dict, config) -> dict:
    """query_key_value rows (heads, 3, head_dim) -> (3, heads, head_dim)."""
    out = dict(state_dict)
    heads, head_dim = config.n_head, config.head_dim
    for key, tensor in state_dict.items():
        if ".attention.query_key_value." in key:
            # (H * 3 * D, ...) -> (H, 3, D, ...) -> (3, H, D, ...) -> (3 * H * D, ...)
            rest = tensor.shape[1:]
            out[key] = (
                tensor.reshape(heads, 3, head_dim, *rest)
                .transpose(0, 1)
                .reshape(3 * heads * head_dim, *rest)
            )
    return out
