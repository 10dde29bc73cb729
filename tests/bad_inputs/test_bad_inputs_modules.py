"""Bad MHA, Mlp, FusedMLP and GatedMlp arguments: a TypeError or ValueError that names the
argument."""

from __future__ import annotations

import pytest

from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import FusedMLP, GatedMlp, Mlp
from tests.bad_inputs.bad_inputs_testing import assert_rejected

MHA_CASES = [
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_heads=2.0), TypeError, "num_heads"),
    (dict(num_heads=3), ValueError, "num_heads"),
    (dict(embed_dim=0), ValueError, "embed_dim"),
    (dict(embed_dim="16"), TypeError, "embed_dim"),
    (dict(num_heads_kv=0), ValueError, "num_heads_kv"),
    (dict(num_heads_kv=3), ValueError, "num_heads_kv"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(cross_attn=None), TypeError, "cross_attn"),
    (dict(layer_idx=-1), ValueError, "layer_idx"),
    (dict(rotary_emb_dim=-2), ValueError, "rotary_emb_dim"),
    (dict(rotary_emb_dim=3), ValueError, "rotary_emb_dim"),
    (dict(rotary_emb_dim=16), ValueError, "rotary_emb_dim"),
    (dict(rotary_emb_base=0.0), ValueError, "rotary_emb_base"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(window_size=4), TypeError, "window_size"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(use_alibi=1.0), TypeError, "use_alibi"),
]


@pytest.mark.parametrize("arguments, error, name", MHA_CASES)
def test_mha_rejects(arguments, error, name):
    assert_rejected(lambda: MHA(**{"embed_dim": 16, "num_heads": 2, **arguments}), error, name)


MLP_CASES = [
    (FusedMLP, dict(hidden_features=0), ValueError, "hidden_features"),
    (FusedMLP, dict(in_features=0), ValueError, "in_features"),
    (FusedMLP, dict(in_features=8.0), TypeError, "in_features"),
    (FusedMLP, dict(out_features=-1), ValueError, "out_features"),
    (FusedMLP, dict(activation="swish"), ValueError, "activation"),
    (FusedMLP, dict(bias1="false"), TypeError, "bias1"),
    (FusedMLP, dict(return_residual=None), TypeError, "return_residual"),
    (FusedMLP, dict(backend="gpu"), ValueError, "backend"),
    (Mlp, dict(hidden_features=0), ValueError, "hidden_features"),
    (Mlp, dict(in_features="8"), TypeError, "in_features"),
    (Mlp, dict(bias2=0.5), TypeError, "bias2"),
    (GatedMlp, dict(hidden_features=0), ValueError, "hidden_features"),
    (GatedMlp, dict(multiple_of=0), ValueError, "multiple_of"),
    (GatedMlp, dict(in_features=None), TypeError, "in_features"),
    (GatedMlp, dict(activation="tanh"), ValueError, "activation"),
]


@pytest.mark.parametrize("cls, arguments, error, name", MLP_CASES)
def test_mlp_rejects(cls, arguments, error, name):
    assert_rejected(lambda: cls(**{"in_features": 8, **arguments}), error, name)
