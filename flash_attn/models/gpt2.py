"""GPT-2 (``GPT2LMHeadModel``) <-> GPTLMHeadModel: our names are GPT-2's, so the table is short.

GPT-2 stores its linear layers as ``Conv1D`` with (in, out) weights: they are transposed to the
``nn.Linear`` (out, in) layout on the way in and back on the way out.
"""

from __future__ import annotations

from flash_attn.models.hf_checkpoint import invert, rename_weights

ARCHITECTURES = ("GPT2LMHeadModel",)

WEIGHT_MAP = {
    "transformer.wte.weight": "transformer.embeddings.wte.weight",
    "transformer.wpe.weight": "transformer.embeddings.wpe.weight",
    "transformer.h.{}.ln_1.weight": "transformer.h.{}.ln_1.weight",
    "transformer.h.{}.ln_1.bias": "transformer.h.{}.ln_1.bias",
    "transformer.h.{}.attn.c_attn.weight": "transformer.h.{}.attn.Wqkv.weight",
    "transformer.h.{}.attn.c_attn.bias": "transformer.h.{}.attn.Wqkv.bias",
    "transformer.h.{}.attn.c_proj.weight": "transformer.h.{}.attn.out_proj.weight",
    "transformer.h.{}.attn.c_proj.bias": "transformer.h.{}.attn.out_proj.bias",
    "transformer.h.{}.ln_2.weight": "transformer.h.{}.ln_2.weight",
    "transformer.h.{}.ln_2.bias": "transformer.h.{}.ln_2.bias",
    "transformer.h.{}.mlp.c_fc.weight": "transformer.h.{}.mlp.fc1.weight",
    "transformer.h.{}.mlp.c_fc.bias": "transformer.h.{}.mlp.fc1.bias",
    "transformer.h.{}.mlp.c_proj.weight": "transformer.h.{}.mlp.fc2.weight",
    "transformer.h.{}.mlp.c_proj.bias": "transformer.h.{}.mlp.fc2.bias",
    "transformer.ln_f.weight": "transformer.ln_f.weight",
    "transformer.ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
# Causal-mask buffers of older checkpoints.
IGNORE = (r"\.attn\.bias$", r"\.attn\.masked_bias$")
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
_ACTIVATIONS = {"gelu_new": "gelu_approx", "gelu_pytorch_tanh": "gelu_approx", "gelu": "gelu",
                "relu": "relu", "silu": "silu"}  # fmt: skip


def config_from_hf(hf: dict) -> dict:
    """GPTConfig fields from a GPT-2 config.json dict."""
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"GPT-2 activation_function {act!r} is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn unsupported")
    return dict(
        vocab_size=hf["vocab_size"],
        n_positions=hf.get("n_positions", 1024),
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_inner=hf.get("n_inner"),
        activation=_ACTIVATIONS[act],
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        embd_pdrop=hf.get("embd_pdrop", 0.0),
        resid_pdrop=hf.get("resid_pdrop", 0.0),
        attn_pdrop=hf.get("attn_pdrop", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def merge_hf(state_dict: dict, config) -> dict:
    """Add the ``transformer.`` prefix of bare GPT2Model checkpoints; Conv1D -> Linear layout."""
    out = {}
    for key, tensor in state_dict.items():
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = tensor.t() if key.endswith(_CONV1D) else tensor
    return out


def config_to_hf(config) -> dict:
    """A GPT-2 config.json dict; ValueError when the model is not a GPT-2 architecture."""
    act = {"gelu_approx": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(config.activation)
    if (
        config.norm_type != "layernorm"
        or config.rotary_emb_dim
        or config.parallel_block
        or config.gated_mlp
        or config.n_head_kv not in (None, config.n_head)
        or act is None
        or not (config.qkv_proj_bias and config.out_proj_bias and config.mlp_fc1_bias)
        or config.lm_head_bias
    ):
        raise ValueError("this model is not a GPT-2 architecture; it cannot be saved as GPT-2")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": act,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "embd_pdrop": config.embd_pdrop,
        "resid_pdrop": config.resid_pdrop,
        "attn_pdrop": config.attn_pdrop,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def state_dict_to_hf(state_dict: dict, config) -> dict:
    """Our state dict (vocab already unpadded) -> GPT-2 keys and Conv1D layouts."""
    out, unexpected = rename_weights(state_dict, invert(WEIGHT_MAP))
    if unexpected:
        raise ValueError(f"weights with no GPT-2 name: {unexpected}")
    return {k: v.t() if k.endswith(_CONV1D) else v for k, v in out.items()}
