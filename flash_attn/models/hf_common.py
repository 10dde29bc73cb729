"""What the Hugging Face family converters share: the activation names, the rope settings, the
config.json names several families use alike, and the weight-map helpers.

Family modules import this module and nothing else of the package, so the registry in
``hf_checkpoint.py`` can import every family without a cycle.
"""

from __future__ import annotations

import re

import torch

# config.json / transformers activation name -> ours (``flash_attn.ops.mlp.ACTIVATIONS``), for
# the converters and for ``flash_attn.integrations.transformers``. "gelu" is the exact erf GELU;
# the other GELU names are the tanh approximation; "swish" is transformers' other name of SiLU.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_approx",
    "gelu_fast": "gelu_approx",
    "gelu_pytorch_tanh": "gelu_approx",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "sigmoid": "sigmoid",
}
# Our activations that have a config.json name.
SAVABLE_ACTIVATIONS = tuple(sorted(set(HF_ACTIVATIONS.values())))


def activation_from_hf(name: str, key: str) -> str:
    """Our activation for the config.json value ``name`` of the field ``key``; ValueError when
    we have none."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{key} {name!r} is not supported; use one of {list(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def activation_to_hf(activation: str, tanh_gelu: str = "gelu_new") -> str | None:
    """The config.json name of our activation (None when it has none); ``tanh_gelu`` names the
    tanh-approximated GELU, as each family writes it."""
    if activation == "gelu_approx":
        return tanh_gelu
    return activation if HF_ACTIVATIONS.get(activation) == activation else None


def check_architecture(config, family: str, **required) -> None:
    """ValueError naming every GPTConfig field (or property) of ``config`` whose value the
    ``family`` layout cannot hold; ``required``: field -> the value it must have, or a tuple of
    the values it may have (a tuple or a range)."""
    wrong = []
    for name, allowed in required.items():
        value = getattr(config, name)
        if value not in (allowed if isinstance(allowed, (tuple, range)) else (allowed,)):
            wrong.append(f"{name}={value!r} (needs {allowed!r})")
    if wrong:
        raise ValueError(f"the {family} layout cannot hold this model: {', '.join(wrong)}")


def rope_to_hf(config) -> dict:
    """The config.json rope fields of a rotary GPTConfig in both styles: ``rope_theta`` +
    ``rope_scaling`` (transformers 4) and ``rope_parameters`` (transformers 5), with
    ``partial_rotary_factor`` when only part of each head rotates."""
    params = {"rope_theta": config.rotary_emb_base, "rope_type": "default"}
    if config.rotary_emb_scaling:
        params = {**config.rotary_emb_scaling, "rope_theta": config.rotary_emb_base}
    out = {
        "rope_theta": config.rotary_emb_base,
        "rope_scaling": config.rotary_emb_scaling,
        "rope_parameters": params,
    }
    if config.rotary_emb_fraction != 1.0:
        out["partial_rotary_factor"] = params["partial_rotary_factor"] = config.rotary_emb_fraction
    return out


def rotary_fields(hf: dict) -> dict:
    """rotary_emb_base, rotary_emb_scaling (None for the default rope) and rotary_emb_fraction
    from either config style: ``rope_theta`` + ``rope_scaling`` (transformers 4) or
    ``rope_parameters`` (transformers 5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    fraction = hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return dict(
        rotary_emb_base=float(theta),
        rotary_emb_scaling=dict(scaling) if rope_type != "default" else None,
        rotary_emb_fraction=float(fraction),
    )


def gpt2_named_fields(hf: dict) -> dict:
    """The fields that GPT-2 style config.json files (GPT-2, GPT-J) name alike."""
    return dict(
        vocab_size=hf["vocab_size"],
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_inner=hf.get("n_inner"),
        activation=activation_from_hf(
            hf.get("activation_function", "gelu_new"), "activation_function"
        ),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        embd_pdrop=hf.get("embd_pdrop", 0.0),
        resid_pdrop=hf.get("resid_pdrop", 0.0),
        attn_pdrop=hf.get("attn_pdrop", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def gpt2_named_fields_to_hf(config, activation: str) -> dict:
    """The inverse of :func:`gpt2_named_fields` (plus n_positions and tied embeddings);
    ``activation``: the config.json name of the MLP activation."""
    return {
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": activation,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "embd_pdrop": config.embd_pdrop,
        "resid_pdrop": config.resid_pdrop,
        "attn_pdrop": config.attn_pdrop,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def decoder_named_fields_to_hf(config) -> dict:
    """The inverse of :func:`decoder_named_fields` (plus max_position_embeddings and tied
    embeddings)."""
    return {
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.n_positions,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "attention_dropout": config.attn_pdrop,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def decoder_named_fields(hf: dict) -> dict:
    """The fields that Llama style config.json files (Llama, Mistral, GPT-NeoX, OPT) name
    alike."""
    return dict(
        vocab_size=hf["vocab_size"],
        n_embd=hf["hidden_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        attn_pdrop=hf.get("attention_dropout", 0.0),
    )


def weight_map(
    top: tuple[str, str | None, str, str],
    layer: str,
    attention: tuple[str, str, str],
    mlp: tuple[str | None, str, str],
) -> dict[str, str]:
    """Hugging Face key template -> ours, for the weight and the bias of every module, from a
    family's module names given in the order of our model.

    Args:
        top: (token embedding, position embedding or None, final norm, LM head) ->
            transformer.embeddings.wte, transformer.embeddings.wpe, transformer.ln_f, lm_head.
        layer: the prefix of layer ``{}`` (the layer index), e.g. ``"model.layers.{}."``.
        attention: (norm, q/k/v projection, output projection) under ``layer`` -> ln_1,
            attn.Wqkv, attn.out_proj of ``transformer.h.{}``.
        mlp: (norm or None when attention's is shared, first linear, second linear) under
            ``layer`` -> ln_2, mlp.fc1, mlp.fc2 of ``transformer.h.{}``.
    """
    our_top = ("transformer.embeddings.wte", "transformer.embeddings.wpe", "transformer.ln_f")
    our_layer = ("ln_1", "attn.Wqkv", "attn.out_proj", "ln_2", "mlp.fc1", "mlp.fc2")
    pairs = list(zip(top, (*our_top, "lm_head")))
    for theirs, ours in zip((*attention, *mlp), our_layer):
        pairs.append((None if theirs is None else layer + theirs, "transformer.h.{}." + ours))
    return {
        f"{theirs}.{param}": f"{ours}.{param}"
        for theirs, ours in pairs
        if theirs is not None
        for param in ("weight", "bias")
    }


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def rename_weights(state_dict: dict, weight_map: dict[str, str], ignore: tuple[str, ...] = ()):
    """Rename keys by templates (``{}`` is the layer index).

    Returns (renamed dict, keys matching no template); ignore: regexes of keys to drop
    (buffers such as rotary inv_freq or causal masks).
    """
    compiled = [(_template_regex(src), dst) for src, dst in weight_map.items()]
    out, unmatched = {}, []
    for key, tensor in state_dict.items():
        if any(re.search(pattern, key) for pattern in ignore):
            continue
        for regex, dst in compiled:
            match = regex.match(key)
            if match:
                out[dst.format(*match.groups())] = tensor
                break
        else:
            unmatched.append(key)
    return out, unmatched


def invert(weight_map: dict[str, str]) -> dict[str, str]:
    """{ours: theirs} from {theirs: ours} (for saving back to the Hugging Face layout)."""
    return {dst: src for src, dst in weight_map.items()}


def concat_rows(state_dict: dict, parts: tuple[str, ...], merged: str) -> dict:
    """``<prefix><part>.weight`` (and ``.bias``) for every part, concatenated along dim 0 in
    the order of parts into ``<prefix><merged>.weight``: e.g. q/k/v_proj -> qkv_proj with rows
    [q; k; v]. Keys without all parts are kept as they are."""
    out = dict(state_dict)
    first = re.compile(rf"^(.*\.){re.escape(parts[0])}\.(weight|bias)$")
    for key in state_dict:
        match = first.match(key)
        if match is None:
            continue
        prefix, param = match.groups()
        names = [f"{prefix}{part}.{param}" for part in parts]
        if all(name in out for name in names):
            out[f"{prefix}{merged}.{param}"] = torch.cat([out.pop(name) for name in names])
    return out


def split_rows(
    state_dict: dict, merged: str, parts: tuple[str, ...], sizes: list[int] | None = None
) -> dict:
    """The inverse of :func:`concat_rows`: ``<prefix><merged>.weight`` (and ``.bias``) split
    along dim 0 into ``<prefix><part>.weight`` of ``sizes`` rows each (default: equal parts)."""
    out = {}
    pattern = re.compile(rf"^(.*\.){re.escape(merged)}\.(weight|bias)$")
    for key, tensor in state_dict.items():
        match = pattern.match(key)
        if match is None:
            out[key] = tensor
            continue
        prefix, param = match.groups()
        pieces = tensor.split(sizes) if sizes else tensor.chunk(len(parts))
        for part, piece in zip(parts, pieces):
            out[f"{prefix}{part}.{param}"] = piece
    return out
