"""GPT language model (GPT-2 / GPT-3 layout, plus the options the Hugging Face families need).

Parameter names follow GPT-2 (``transformer.h.{i}.ln_1``, ``.attn``, ``.ln_2``, ``.mlp``,
``transformer.ln_f``, ``lm_head``) so the GPT-2 converter is a short table. Families
(GPT-NeoX, Llama/Mistral, OPT, GPT-J) differ only through :class:`GPTConfig` fields.

Every fused op has a flag; a flag that is off selects the plain-PyTorch path of that op, and
an op that is on uses ``backend`` (None: Triton on CUDA, PyTorch elsewhere), so the model runs
on a CPU with any flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from flash_attn.models import generation
from flash_attn.models.hf_checkpoint import SpecialTokens, load_hf_checkpoint, save_hf_checkpoint
from flash_attn.modules.block import Block, ParallelBlock
from flash_attn.modules.embedding import GPT2Embeddings
from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import FusedMLP, GatedMlp, Mlp
from flash_attn.modules.norm import LayerNorm, RMSNorm
from flash_attn.ops.backend import reads_values
from flash_attn.ops.cross_entropy import cross_entropy_loss
from flash_attn.ops.linear_cross_entropy import linear_cross_entropy
from flash_attn.ops.mlp import ACTIVATIONS
from flash_attn.utils.checks import (
    check_backend,
    check_bool,
    check_choice,
    check_float,
    check_int,
)

_PRESETS: dict[str, dict] = {
    # GPT-2 (OpenAI), context 1024.
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
    # GPT-3 sizes (Brown et al. 2020, table 2.1) trained on The Pile, context 2048.
    "gpt3-125m": dict(n_layer=12, n_embd=768, n_head=12, n_positions=2048),
    "gpt3-350m": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=2048),
    "gpt3-760m": dict(n_layer=24, n_embd=1536, n_head=16, n_positions=2048),
    "gpt3-1.3b": dict(n_layer=24, n_embd=2048, n_head=16, n_positions=2048),
    "gpt3-2.7b": dict(n_layer=32, n_embd=2560, n_head=32, n_positions=2048),
}


@dataclass
class GPTConfig:
    """Architecture and fused-op options of :class:`GPTLMHeadModel`.

    Sizes:
        vocab_size: tokens (the embedding is padded to ``pad_vocab_size_multiple``; logits are
            sliced back to vocab_size). n_positions: learned positions (0 with rotary only).
        n_embd, n_layer, n_head: width, depth, query heads; n_head_kv: key/value heads (GQA).
        n_inner: MLP hidden width (default 4 * n_embd; for gated MLPs the gated width).
    Architecture:
        activation: MLP activation ("gelu_approx" GPT-2, "gelu", "relu", "silu" ...).
        gated_mlp: SwiGLU-style MLP (Llama). norm_type: "layernorm" or "rmsnorm".
        layer_norm_epsilon: norm eps. parallel_block: GPT-J/NeoX parallel attention + MLP;
        parallel_block_tied_norm: one norm for both branches (GPT-J).
        qkv_proj_bias, out_proj_bias, mlp_fc1_bias, mlp_fc2_bias, lm_head_bias: biases.
        rotary_emb_fraction: fraction of head_dim rotated (0: none; learned positions if
            n_positions > 0). rotary_emb_base, rotary_emb_interleaved (GPT-J),
            rotary_emb_scaling (Hugging Face rope_scaling dict).
        sliding_window: attention window (Mistral), None for full causal attention.
        tie_word_embeddings: lm_head shares wte's weight.
    Training:
        embd_pdrop, resid_pdrop, attn_pdrop: dropouts. initializer_range: std of the GPT-2
            init (residual projections use std / sqrt(2 * n_layer)).
        residual_in_fp32: residual stream in fp32 under half-precision weights.
    Fused ops (on: ``backend``; off: plain PyTorch):
        fused_dropout_add_ln, fused_mlp, fused_cross_entropy, linear_cross_entropy (loss
        without materialising logits; ``.logits`` is then None when labels are given),
        fused_rotary, backend (None/"auto", "triton", "torch": attention and fused ops).
    Checkpoints:
        hf_family: the Hugging Face family the weights were loaded from ("gpt2", "llama" ...,
            see ``flash_attn.models.hf_checkpoint.FAMILIES``); the layout save_pretrained writes
            by default.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_head_kv: int | None = None
    n_inner: int | None = None
    activation: str = "gelu_approx"
    gated_mlp: bool = False
    norm_type: str = "layernorm"
    layer_norm_epsilon: float = 1e-5
    parallel_block: bool = False
    parallel_block_tied_norm: bool = False
    qkv_proj_bias: bool = True
    out_proj_bias: bool = True
    mlp_fc1_bias: bool = True
    mlp_fc2_bias: bool = True
    lm_head_bias: bool = False
    rotary_emb_fraction: float = 0.0
    rotary_emb_base: float = 10000.0
    rotary_emb_interleaved: bool = False
    rotary_emb_scaling: dict | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = True
    pad_vocab_size_multiple: int = 8
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    initializer_range: float = 0.02
    residual_in_fp32: bool = True
    fused_dropout_add_ln: bool = True
    fused_mlp: bool = True
    fused_cross_entropy: bool = True
    linear_cross_entropy: bool = False
    fused_rotary: bool = True
    backend: str | None = None
    hf_family: str | None = None

    def __post_init__(self):
        for name, check in _FIELD_CHECKS.items():
            check(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head_kv must divide n_head ({self.n_head}), got {self.n_head_kv}")
        if self.rotary_emb_scaling is not None and not isinstance(self.rotary_emb_scaling, dict):
            raise TypeError(
                "rotary_emb_scaling must be a dict (Hugging Face rope_scaling) or None, got "
                f"{self.rotary_emb_scaling!r}"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_head_kv is None else self.n_head_kv

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_emb_dim(self) -> int:
        return int(self.rotary_emb_fraction * self.head_dim) // 2 * 2

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def max_seqlen(self) -> int | None:
        """Longest sequence the positions allow (None: rotary only, unbounded)."""
        return self.n_positions if self.rotary_emb_dim == 0 else None

    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by :meth:`from_preset`."""
        return list(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A named size ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-125m",
        "gpt3-350m", "gpt3-760m", "gpt3-1.3b", "gpt3-2.7b"), with fields overridden."""
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(_PRESETS)}")
        return cls(**{**_PRESETS[key], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_POSITIVE_INT = partial(check_int, minimum=1)
_FLAGS = [f.name for f in dataclasses.fields(GPTConfig) if f.type == "bool"]
_DROPOUT = partial(check_float, low=0.0, high=1.0, high_open=True)
# GPTConfig field -> check(name, value): the kind and range each field must have
# (every bool field must be a bool: a string such as "false" would count as true).
_FIELD_CHECKS = {
    **dict.fromkeys(
        ("vocab_size", "n_embd", "n_layer", "n_head", "pad_vocab_size_multiple"), _POSITIVE_INT
    ),
    "n_positions": partial(check_int, minimum=0),
    "n_head_kv": partial(check_int, minimum=1, optional=True),
    "n_inner": partial(check_int, minimum=1, optional=True),
    "sliding_window": partial(check_int, minimum=1, optional=True),
    "activation": partial(check_choice, choices=ACTIVATIONS),
    "norm_type": partial(check_choice, choices=("layernorm", "rmsnorm")),
    "backend": check_backend,
    "layer_norm_epsilon": partial(check_float, low=0.0, low_open=True),
    "rotary_emb_fraction": partial(check_float, low=0.0, high=1.0),
    "rotary_emb_base": partial(check_float, low=0.0, low_open=True),
    "initializer_range": partial(check_float, low=0.0),
    **dict.fromkeys(("embd_pdrop", "resid_pdrop", "attn_pdrop"), _DROPOUT),
    **dict.fromkeys(_FLAGS, check_bool),
}


# Weights with one row per vocabulary entry: padded to padded_vocab_size in the model, saved
# with vocab_size rows.
_VOCAB_ROWS = ("transformer.embeddings.wte.weight", "lm_head.weight", "lm_head.bias")


@dataclass
class CausalLMOutput:
    """logits (batch, seqlen, vocab_size) (None with linear_cross_entropy and labels);
    loss: fp32 scalar when labels were given."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


def _norm(
    config: GPTConfig, dropout_p: float = 0.0, prenorm: bool = False, device=None, dtype=None
) -> nn.Module:
    """The norm of one place in the stack: dropout(x) + residual, then norm.

    dropout_p: the dropout of the branch that flows into it; prenorm: also return the sum (the
    residual stream) for the next block. The fused_dropout_add_ln flag picks its backend here.
    """
    cls = RMSNorm if config.norm_type == "rmsnorm" else LayerNorm
    return cls(
        config.n_embd,
        eps=config.layer_norm_epsilon,
        dropout_p=dropout_p,
        prenorm=prenorm,
        residual_in_fp32=config.residual_in_fp32,
        bias=config.norm_type == "layernorm",
        backend=config.backend if config.fused_dropout_add_ln else "torch",
        device=device,
        dtype=dtype,
    )


def _build_block(config: GPTConfig, layer_idx: int, device=None, dtype=None) -> nn.Module:
    factory = dict(device=device, dtype=dtype)
    window = (-1, -1) if config.sliding_window is None else (config.sliding_window - 1, 0)
    attn = MHA(
        config.n_embd,
        config.n_head,
        num_heads_kv=config.n_head_kv,
        qkv_proj_bias=config.qkv_proj_bias,
        out_proj_bias=config.out_proj_bias,
        dropout=config.attn_pdrop,
        causal=True,
        layer_idx=layer_idx,
        rotary_emb_dim=config.rotary_emb_dim,
        rotary_emb_base=config.rotary_emb_base,
        rotary_emb_interleaved=config.rotary_emb_interleaved,
        rotary_emb_scaling=config.rotary_emb_scaling,
        rotary_max_position_embeddings=config.n_positions or None,
        window_size=window,
        backend=config.backend,
        rotary_backend=config.backend if config.fused_rotary else "torch",
        **factory,
    )
    mlp_backend = config.backend if config.fused_mlp else "torch"
    mlp_args = dict(
        activation=config.activation,
        bias1=config.mlp_fc1_bias,
        bias2=config.mlp_fc2_bias,
        backend=mlp_backend,
        **factory,
    )
    if config.gated_mlp:
        hidden = config.n_inner or 4 * config.n_embd
        mlp = GatedMlp(config.n_embd, hidden, **mlp_args)
    else:
        mlp_cls = FusedMLP if config.fused_mlp else Mlp
        mlp = mlp_cls(config.n_embd, config.n_inner or 4 * config.n_embd, **mlp_args)
    # ln_1 receives the embeddings (first block) or the previous block's mlp output.
    incoming_dropout = config.embd_pdrop if layer_idx == 0 else config.resid_pdrop
    ln_1 = _norm(config, incoming_dropout, prenorm=True, **factory)
    if config.parallel_block:
        ln_2 = None if config.parallel_block_tied_norm else _norm(config, **factory)
        return ParallelBlock(attn, mlp, ln_1, ln_2)
    return Block(attn, mlp, ln_1, _norm(config, config.resid_pdrop, prenorm=True, **factory))


def document_layout(document_starts: torch.Tensor):
    """Packed documents as varlen sequences.

    Args:
        document_starts: (batch, seqlen) bool, true at the first token of each document; the
            first token of each row always starts one (a document cut by the window's edge).
    Returns:
        cu_seqlens (num_documents + 1,) int32 offsets into the flattened (batch * seqlen)
        tokens, max_seqlen (int, the longest document), position_ids (batch, seqlen) int64
        counting from 0 in each document.
    """
    starts = document_starts.bool().clone()
    starts[:, 0] = True
    flat = starts.flatten()  # (B * T,)
    first = flat.nonzero().squeeze(1)  # (num_documents,) index of each document's first token
    total = torch.tensor([flat.numel()], device=flat.device)
    cu_seqlens = torch.cat([first, total]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    own_first = first[flat.long().cumsum(0) - 1]  # (B * T,) first token of each token's document
    position_ids = torch.arange(flat.numel(), device=flat.device) - own_first
    return cu_seqlens, max_seqlen, position_ids.view(starts.shape)


class GPTModel(nn.Module):
    """Embeddings, n_layer blocks and the final norm: input_ids -> hidden states."""

    def __init__(self, config: GPTConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        positions = config.n_positions if config.rotary_emb_dim == 0 else 0
        self.embeddings = GPT2Embeddings(
            config.n_embd, config.padded_vocab_size, positions, device=device, dtype=dtype
        )
        self.h = nn.ModuleList(
            [_build_block(config, i, device, dtype) for i in range(config.n_layer)]
        )
        self.ln_f = _norm(config, config.resid_pdrop, device=device, dtype=dtype)

    def forward(
        self,
        input_ids,
        position_ids=None,
        inference_params=None,
        key_padding_mask=None,
        document_starts=None,
    ):
        """input_ids (batch, seqlen) -> hidden states (batch, seqlen, n_embd).

        document_starts: (batch, seqlen) bool, true at each document's first token: tokens
        attend only within their document and positions restart at 0 in each (see
        :func:`document_layout`).
        """
        config = self.config
        if position_ids is None and inference_params is not None:
            offset = inference_params.seqlen_offset
            position_ids = torch.arange(
                offset, offset + input_ids.shape[1], device=input_ids.device
            )
        attn_kwargs = {}
        if document_starts is not None:
            if inference_params is not None or key_padding_mask is not None:
                raise ValueError("document_starts cannot be combined with a KV cache or padding")
            cu_seqlens, max_seqlen, doc_positions = document_layout(document_starts)
            position_ids = doc_positions if position_ids is None else position_ids
            attn_kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        hidden = self.embeddings(input_ids, position_ids)
        if document_starts is not None:
            hidden = hidden.flatten(0, 1)  # (B, T, E) -> (B * T, E): the varlen layout
        if inference_params is not None:
            attn_kwargs["inference_params"] = inference_params
        if key_padding_mask is not None:
            attn_kwargs["key_padding_mask"] = key_padding_mask
        residual = hidden2 = None
        for block in self.h:
            if config.parallel_block:
                hidden, hidden2, residual = block(hidden, hidden2, residual, **attn_kwargs)
            else:
                hidden, residual = block(hidden, residual, **attn_kwargs)
        if hidden2 is not None:
            p = self.ln_f.dropout_p if self.training else 0.0
            residual = residual + F.dropout(hidden2, p, self.training)
        hidden = self.ln_f(hidden, residual)
        if document_starts is not None:
            hidden = hidden.unflatten(0, input_ids.shape)  # (B * T, E) -> (B, T, E)
        return hidden


def _check_positions_and_mask(config: GPTConfig, input_ids, position_ids, attention_mask):
    """ValueError/TypeError naming position_ids or attention_mask when they do not fit
    input_ids (batch, seqlen): learned positions beyond n_positions (checked for CPU inputs,
    like input_ids), a mask of another shape, or a row of the mask with no real token."""
    batch, seqlen = input_ids.shape
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids!r}")
        if position_ids.shape not in ((seqlen,), (batch, seqlen)):
            raise ValueError(
                f"position_ids must be ({seqlen},) or ({batch}, {seqlen}), got "
                f"{tuple(position_ids.shape)}"
            )
        limit = config.max_seqlen
        if limit is not None and position_ids.device.type == "cpu" and position_ids.numel():
            low, high = int(position_ids.min()), int(position_ids.max())
            if low < 0 or high >= limit:
                raise ValueError(
                    f"position_ids must lie in [0, n_positions={limit}), got [{low}, {high}]"
                )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != (batch, seqlen):
            raise ValueError(
                f"attention_mask must be (batch, seqlen) = ({batch}, {seqlen}), got "
                f"{tuple(attention_mask.shape)}"
            )
        if not bool(attention_mask.bool().any(dim=1).all()):
            raise ValueError(
                "attention_mask has a row with no real token (all zeros); every sequence needs "
                "at least one"
            )


class GPTLMHeadModel(nn.Module):
    """GPT with a language-model head.

    Args:
        config: a :class:`GPTConfig`.
    forward(input_ids, labels=None, ...) -> :class:`CausalLMOutput`.
    """

    def __init__(self, config: GPTConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = GPTModel(config, device, dtype)
        self.lm_head = nn.Linear(
            config.n_embd,
            config.padded_vocab_size,
            bias=config.lm_head_bias,
            device=device,
            dtype=dtype,
        )
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.embeddings.wte.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, initializer_range) for linear and embedding weights, zero biases,
        residual output projections (attn.out_proj, mlp.fc2) scaled by 1 / sqrt(2 * n_layer)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.endswith(("out_proj", "fc2"))
                nn.init.normal_(
                    module.weight, std=std / math.sqrt(2 * self.config.n_layer) if scaled else std
                )
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False, only_trainable: bool = False) -> int:
        """Parameter count (tied weights once); exclude_embeddings drops wte and wpe."""
        seen, total = set(), 0
        skip = set()
        if exclude_embeddings:
            emb = self.transformer.embeddings
            skip = {id(p) for p in emb.parameters()}
        for p in self.parameters():
            if id(p) in seen or id(p) in skip or (only_trainable and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inference_params=None,
        attention_mask: torch.Tensor | None = None,
        num_last_tokens: int = 0,
        shift_labels: bool = True,
        reduction: str = "mean",
        document_starts: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits and, with labels, the next-token loss.

        Args:
            input_ids: (batch, seqlen) int64 in [0, vocab_size).
            labels: (batch, seqlen) int64; -100 is ignored.
            position_ids: (seqlen,) or (batch, seqlen) learned positions (default 0..).
            inference_params: KV cache for decoding (see ``flash_attn.models.generation``).
            attention_mask: (batch, seqlen) bool/0-1, true for real tokens (right padding).
            num_last_tokens: > 0: only the logits of the last tokens are computed.
            shift_labels: True: the loss compares logits[:, t] with labels[:, t + 1] (shifted
                inside, as Hugging Face does); False: labels are already aligned, labels[:, t]
                is the target of position t (inputs = w[:, :-1], labels = w[:, 1:]).
            reduction: "mean" (over non-ignored tokens), "sum" or "none" (per-token losses of
                shape (batch, seqlen - 1) when shifted, (batch, seqlen) otherwise).
            document_starts: (batch, seqlen) bool, true at the first token of each document
                packed into the rows: attention stays within documents (varlen kernel) and
                positions restart at 0. With shift_labels, a document's first token is not a
                target; with aligned labels the caller sets those targets to -100.
        Returns:
            :class:`CausalLMOutput` with logits (batch, seqlen, vocab_size) in the model dtype
            and loss (fp32) when labels are given.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                "input_ids must be a (batch, seqlen) integer tensor, got "
                + (
                    str(tuple(input_ids.shape))
                    if isinstance(input_ids, torch.Tensor)
                    else type(input_ids).__name__
                )
            )
        if min(input_ids.shape) == 0:
            raise ValueError(
                f"input_ids must hold at least one token per row (batch >= 1, seqlen >= 1), "
                f"got shape {tuple(input_ids.shape)}"
            )
        vocab = self.config.vocab_size
        if input_ids.numel() and reads_values(input_ids):  # a GPU would synchronise
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(f"input_ids must lie in [0, {vocab}), got [{low}, {high}]")
        max_len = self.config.max_seqlen
        offset = inference_params.seqlen_offset if inference_params is not None else 0
        if max_len is not None and input_ids.shape[1] + offset > max_len:
            raise ValueError(
                f"sequence length {input_ids.shape[1] + offset} exceeds n_positions={max_len}"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have input_ids' shape {tuple(input_ids.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        _check_positions_and_mask(self.config, input_ids, position_ids, attention_mask)
        check_int("num_last_tokens", num_last_tokens, minimum=0)
        key_padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding_mask = attention_mask.bool()
        if document_starts is not None and document_starts.shape != input_ids.shape:
            raise ValueError(
                f"document_starts must have input_ids' shape {tuple(input_ids.shape)}, "
                f"got {tuple(document_starts.shape)}"
            )
        hidden = self.transformer(
            input_ids, position_ids, inference_params, key_padding_mask, document_starts
        )
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        weight = self.lm_head.weight[:vocab]  # padded rows never reach the logits or loss
        bias = self.lm_head.bias[:vocab] if self.lm_head.bias is not None else None
        # Positions whose target is known: all but the last when the labels are shifted inside.
        scored = slice(None, -1) if shift_labels else slice(None)
        if labels is not None and shift_labels:
            labels = labels[:, 1:]  # (B, T) -> (B, T - 1), labels[:, t] now targets position t
            if document_starts is not None:  # the previous document cannot predict it
                labels = labels.masked_fill(document_starts[:, 1:].bool(), -100)
        if labels is not None and self.config.linear_cross_entropy:
            loss = linear_cross_entropy(
                hidden[:, scored],
                weight,
                labels.contiguous(),
                bias,
                reduction=reduction,
                backend=self.config.backend,
            )
            return CausalLMOutput(logits=None, loss=loss)
        logits = F.linear(hidden, weight, bias)  # (B, T, E) -> (B, T, vocab)
        loss = None
        if labels is not None:
            ce_backend = self.config.backend if self.config.fused_cross_entropy else "torch"
            loss = cross_entropy_loss(
                logits[:, scored].flatten(0, 1),  # (B, T', V) -> (B * T', V)
                labels.flatten(),  # (B, T') -> (B * T',)
                reduction=reduction,
                backend=ce_backend,
            )
            if reduction == "none":
                loss = loss.view(labels.shape)  # (B * T',) -> (B, T')
        return CausalLMOutput(logits=logits, loss=loss)

    # bos/eos/pad ids and generation settings of the checkpoint from_pretrained read, which
    # save_pretrained writes back (None: a model built here; no ids are set).
    hf_special_tokens: SpecialTokens | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=None, device=None, **config_overrides):
        """Load a Hugging Face checkpoint (local folder, or hub id when online).

        Supported architectures: see ``flash_attn.models.hf_checkpoint.SUPPORTED``.
        config_overrides set GPTConfig fields (fused flags, backend, dropouts); a size that
        differs from the checkpoint's is a ValueError. Raises
        ValueError when a weight is missing, unexpected or of another shape, so that none
        stays at its random init. The checkpoint's special tokens are kept in
        ``hf_special_tokens``.
        """
        fields, state_dict, special_tokens = load_hf_checkpoint(name_or_path)
        sizes = ("vocab_size", "n_embd", "n_layer", "n_head", "n_head_kv", "n_inner")
        changed = [
            f"{k}={config_overrides[k]!r} (checkpoint: {fields.get(k)!r})"
            for k in sizes
            if k in config_overrides and config_overrides[k] != fields.get(k)
        ]
        if changed:
            raise ValueError(
                f"config overrides change the sizes of {str(name_or_path)!r}: "
                f"{', '.join(changed)}; override only dropouts, fused flags and the backend"
            )
        model = cls(GPTConfig(**{**fields, **config_overrides}), device=device, dtype=dtype)
        model._load_checkpoint_weights(state_dict, str(name_or_path))
        model.hf_special_tokens = special_tokens
        return model

    def _load_checkpoint_weights(self, state_dict: dict, source: str) -> None:
        """Every weight from state_dict (our names, vocab rows not padded); ValueError listing
        the missing, unexpected and misshapen ones."""
        config = self.config
        own = self.state_dict()
        if config.tie_word_embeddings:
            own.pop("lm_head.weight")
            state_dict.pop("lm_head.weight", None)
        for key in _VOCAB_ROWS:  # padded rows are zeros: they never reach the logits
            tensor = state_dict.get(key)
            if tensor is not None and tensor.shape[0] < config.padded_vocab_size:
                rows = config.padded_vocab_size - tensor.shape[0]
                state_dict[key] = torch.cat([tensor, tensor.new_zeros(rows, *tensor.shape[1:])])
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {source!r} does not match the {config.hf_family} layout: "
                f"missing weights {missing}, unexpected weights {unexpected}"
            )
        for key, tensor in state_dict.items():
            if tensor.shape != own[key].shape:
                raise ValueError(
                    f"weight {key!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                    f"the model expects {tuple(own[key].shape)}"
                )
        self.load_state_dict(state_dict, strict=False)

    def save_pretrained(self, path, family: str | None = None, tokenizer=None) -> None:
        """Write a folder that ``transformers.AutoModelForCausalLM`` opens: config.json (with
        the bos/eos/pad ids of ``hf_special_tokens``), model.safetensors and
        generation_config.json.

        Args:
            path: the folder, created if needed.
            family: the Hugging Face layout, a name of ``hf_checkpoint.FAMILIES`` ("gpt2",
                "gpt_neox", "llama", "opt", "gptj"); default: the family it was loaded from,
                else the first whose architecture matches the model's.
            tokenizer: a transformers tokenizer or a ``tokenizers.Tokenizer``, written beside
                the weights so ``AutoTokenizer`` opens the folder; its bos/eos/pad ids
                replace the model's where it has them.
        """
        state_dict = self.state_dict()
        if self.config.tie_word_embeddings:
            state_dict.pop("lm_head.weight")
        for key in _VOCAB_ROWS:
            if key in state_dict:
                state_dict[key] = state_dict[key][: self.config.vocab_size]
        save_hf_checkpoint(
            path, self.config, state_dict, family, self.hf_special_tokens, tokenizer=tokenizer
        )

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None):
        """{layer_idx: (k_cache, v_cache)} for ``InferenceParams.key_value_memory_dict``."""
        return {
            i: block.attn.allocate_inference_cache(batch_size, max_seqlen, dtype)
            for i, block in enumerate(self.transformer.h)
        }

    def generate(self, input_ids, max_new_tokens, **kwargs):
        """See :func:`flash_attn.models.generation.generate`."""
        return generation.generate(self, input_ids, max_new_tokens, **kwargs)
