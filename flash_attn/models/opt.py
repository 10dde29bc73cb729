"""OPT (``OPTForCausalLM``, pre-norm sizes) -> GPTLMHeadModel.

OPT's learned positions start at row 2 of ``embed_positions`` (rows 0 and 1 are a legacy
offset), so those rows are dropped. The post-norm OPT-350m layout (``do_layer_norm_before``
false, ``word_embed_proj_dim`` != hidden) is rejected.
"""

from __future__ import annotations

import torch

ARCHITECTURES = ("OPTForCausalLM",)

_LAYER = "model.decoder.layers.{}."
_OURS = "transformer.h.{}."
WEIGHT_MAP = {
    "model.decoder.embed_tokens.weight": "transformer.embeddings.wte.weight",
    "model.decoder.embed_positions.weight": "transformer.embeddings.wpe.weight",
    _LAYER + "self_attn_layer_norm.weight": _OURS + "ln_1.weight",
    _LAYER + "self_attn_layer_norm.bias": _OURS + "ln_1.bias",
    _LAYER + "self_attn.qkv_proj.weight": _OURS + "attn.Wqkv.weight",  # made by merge_hf
    _LAYER + "self_attn.qkv_proj.bias": _OURS + "attn.Wqkv.bias",
    _LAYER + "self_attn.out_proj.weight": _OURS + "attn.out_proj.weight",
    _LAYER + "self_attn.out_proj.bias": _OURS + "attn.out_proj.bias",
    _LAYER + "final_layer_norm.weight": _OURS + "ln_2.weight",
    _LAYER + "final_layer_norm.bias": _OURS + "ln_2.bias",
    _LAYER + "fc1.weight": _OURS + "mlp.fc1.weight",
    _LAYER + "fc1.bias": _OURS + "mlp.fc1.bias",
    _LAYER + "fc2.weight": _OURS + "mlp.fc2.weight",
    _LAYER + "fc2.bias": _OURS + "mlp.fc2.bias",
    "model.decoder.final_layer_norm.weight": "transformer.ln_f.weight",
    "model.decoder.final_layer_norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
_POSITION_OFFSET = 2
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_approx"}


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from an OPT config.json dict."""
    hidden = hf["hidden_size"]
    if not hf.get("do_layer_norm_before", True) or hf.get("word_embed_proj_dim", hidden) != hidden:
        raise ValueError(
            "OPT with do_layer_norm_before=False or word_embed_proj_dim != hidden_size "
            "(opt-350m) is not supported"
        )
    act = hf.get("activation_function", "relu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation_function {act!r} is not supported")
    bias = hf.get("enable_bias", True)
    return dict(
        vocab_size=hf["vocab_size"],
        n_positions=hf["max_position_embeddings"],
        n_embd=hidden,
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_inner=hf["ffn_dim"],
        activation=_ACTIVATIONS[act],
        qkv_proj_bias=bias,
        out_proj_bias=bias,
        mlp_fc1_bias=bias,
        mlp_fc2_bias=bias,
        resid_pdrop=hf.get("dropout", 0.0),
        embd_pdrop=hf.get("dropout", 0.0),
        attn_pdrop=hf.get("attention_dropout", 0.0),
        initializer_range=hf.get("init_std", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def merge_hf(state_dict: dict, config) -> dict:
    """Drop the ``model.`` prefix differences, stack q/k/v, skip the position offset rows."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("decoder."):  # bare OPTModel checkpoints
            key = "model." + key
        out[key] = tensor
    positions = out.get("model.decoder.embed_positions.weight")
    if positions is not None:
        out["model.decoder.embed_positions.weight"] = positions[_POSITION_OFFSET:]
    for i in range(config.n_layer):
        prefix = _LAYER.format(i)
        for suffix in ("weight", "bias"):
            names = [f"{prefix}self_attn.{p}_proj.{suffix}" for p in "qkv"]
            if all(n in out for n in names):
                out[f"{prefix}self_attn.qkv_proj.{suffix}"] = torch.cat([out.pop(n) for n in names])
    return out
