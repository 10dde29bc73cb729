"""GPT-J (``GPTJForCausalLM``) -> GPTLMHeadModel.

Parallel block with one norm shared by attention and MLP, interleaved (GPT-J) rotary on the
first ``rotary_dim`` features of each head, no attention biases, an LM head with a bias.
"""

from __future__ import annotations

import torch

ARCHITECTURES = ("GPTJForCausalLM",)

_LAYER = "transformer.h.{}."
_OURS = "transformer.h.{}."
WEIGHT_MAP = {
    "transformer.wte.weight": "transformer.embeddings.wte.weight",
    _LAYER + "ln_1.weight": _OURS + "ln_1.weight",
    _LAYER + "ln_1.bias": _OURS + "ln_1.bias",
    _LAYER + "attn.qkv_proj.weight": _OURS + "attn.Wqkv.weight",  # made by merge_hf
    _LAYER + "attn.out_proj.weight": _OURS + "attn.out_proj.weight",
    _LAYER + "mlp.fc_in.weight": _OURS + "mlp.fc1.weight",
    _LAYER + "mlp.fc_in.bias": _OURS + "mlp.fc1.bias",
    _LAYER + "mlp.fc_out.weight": _OURS + "mlp.fc2.weight",
    _LAYER + "mlp.fc_out.bias": _OURS + "mlp.fc2.bias",
    "transformer.ln_f.weight": "transformer.ln_f.weight",
    "transformer.ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}
IGNORE = (r"\.attn\.bias$", r"\.attn\.masked_bias$", r"embed_positions$")
_ACTIVATIONS = {"gelu_new": "gelu_approx", "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from a GPT-J config.json dict."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"activation_function {act!r} is not supported")
    head_dim = hf["n_embd"] // hf["n_head"]
    rotary_dim = hf.get("rotary_dim") or head_dim
    return dict(
        vocab_size=hf["vocab_size"],
        n_positions=hf.get("n_positions", 2048),
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_inner=hf.get("n_inner"),
        activation=_ACTIVATIONS[act],
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        parallel_block=True,
        parallel_block_tied_norm=True,
        qkv_proj_bias=False,
        out_proj_bias=False,
        lm_head_bias=True,
        rotary_emb_fraction=rotary_dim / head_dim,
        rotary_emb_interleaved=True,
        embd_pdrop=hf.get("embd_pdrop", 0.0),
        resid_pdrop=hf.get("resid_pdrop", 0.0),
        attn_pdrop=hf.get("attn_pdrop", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def merge_hf(state_dict: dict, config) -> dict:
    """q/k/v_proj -> qkv_proj (rows [q; k; v])."""
    out = dict(state_dict)
    for i in range(config.n_layer):
        prefix = _LAYER.format(i)
        names = [f"{prefix}attn.{p}_proj.weight" for p in "qkv"]
        if all(n in out for n in names):
            out[f"{prefix}attn.qkv_proj.weight"] = torch.cat([out.pop(n) for n in names])
    return out
