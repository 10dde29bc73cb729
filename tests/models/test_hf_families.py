"""Tiny random Hugging Face models -> from_pretrained -> same logits and greedy tokens as HF."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flash_attn.models.gpt import GPTLMHeadModel  # noqa: E402

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Sizes under the config.json names of GPT-2 style and of Llama style families.
GPT2_SIZES = dict(COMMON, n_positions=64, n_embd=64, n_layer=2, n_head=4)
DECODER_SIZES = dict(
    COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)


def _hf_config(family: str):
    t = transformers
    if family == "gpt2":
        return t.GPT2Config(**GPT2_SIZES)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(intermediate_size=128, rotary_pct=0.5, **DECODER_SIZES)
    if family == "llama":
        return t.LlamaConfig(
            intermediate_size=96,
            num_key_value_heads=2,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            **DECODER_SIZES,
        )
    if family == "llama3":  # Llama 3.1 frequency scaling, GQA, tied embeddings
        return t.LlamaConfig(
            intermediate_size=96,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            **DECODER_SIZES,
        )
    if family == "mistral":
        return t.MistralConfig(
            intermediate_size=96,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=5,
            **DECODER_SIZES,
        )
    if family == "opt":
        return t.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **DECODER_SIZES)
    if family == "gptj":
        return t.GPTJConfig(rotary_dim=8, **GPT2_SIZES)
    raise AssertionError(family)


FAMILIES = ("gpt2", "gpt_neox", "llama", "llama3", "mistral", "opt", "gptj")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, HF model in eval mode), built once per test module."""
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        config = _hf_config(family)
        config.initializer_range = 0.2  # larger weights: varied greedy tokens, not one repeated
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (folder, model.eval())
    return out


def _ids(batch=2, seqlen=13, seed=1):
    return torch.randint(3, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_match_hf_torch(checkpoints, family):
    folder, hf = checkpoints[family]
    model = GPTLMHeadModel.from_pretrained(folder, backend="torch").eval()
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        logits = model(ids).logits
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    prompt = ids[:, :4]
    ours = model.generate(prompt, 10, top_k=1)
    theirs = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
    )
    assert torch.equal(ours, theirs), (ours, theirs)
    # The generated text is not one token repeated (the test would be weak otherwise).
    assert len(set(ours[0, 4:].tolist())) > 1


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj"])
def test_logits_match_hf_triton(checkpoints, family, monkeypatch):
    """Fused ops and attention through the Triton kernels (interpreter on CPU)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FLASH_ATTN_BACKEND", "triton")
    folder, hf = checkpoints[family]
    model = GPTLMHeadModel.from_pretrained(folder).eval()
    ids = _ids(batch=1, seqlen=7)
    with torch.no_grad():
        expected = hf(ids).logits
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def _assert_reopened_matches(model, folder, reference, atol):
    """``model`` written by save_pretrained and opened by transformers gives the logits of
    ``reference``."""
    model.save_pretrained(folder)
    reopened = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _ids()
    torch.testing.assert_close(reopened(ids).logits, reference(ids).logits, atol=atol, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_roundtrip(checkpoints, family, tmp_path):
    """HF folder -> our model -> save_pretrained -> transformers: the same logits, config,
    special-token ids and generation settings."""
    folder, hf = checkpoints[family]
    model = GPTLMHeadModel.from_pretrained(folder, backend="torch").eval()
    _assert_reopened_matches(model, tmp_path, hf, atol=1e-5)
    saved = transformers.AutoConfig.from_pretrained(tmp_path)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(saved, key) == getattr(hf.config, key) == COMMON[key], key
        assert getattr(generation, key) == COMMON[key], key
    assert saved.tie_word_embeddings == hf.config.tie_word_embeddings
    if family.startswith("llama"):
        assert saved.rope_parameters == hf.config.rope_parameters


def test_save_pretrained_without_ids_writes_none(tmp_path):
    """A model built here has no special tokens: config.json says so, instead of leaving
    transformers to fill in GPT-2's 50256 (not a token of this vocabulary)."""
    from flash_attn.models.gpt import GPTConfig

    model = GPTLMHeadModel(GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    model.save_pretrained(tmp_path)
    saved = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (saved.bos_token_id, saved.eos_token_id, saved.pad_token_id) == (None, None, None)


def test_tokenizer_ids_replace_the_models_but_keep_stop_lists():
    from flash_attn.models.hf_checkpoint import SpecialTokens

    stored = SpecialTokens(
        {"bos_token_id": 1, "eos_token_id": [7, 9], "pad_token_id": None},
        {"eos_token_id": [7, 9], "temperature": 0.6},
    )
    merged = stored.with_ids({"bos_token_id": 3, "eos_token_id": 9, "pad_token_id": None})
    assert merged.ids == {"bos_token_id": 3, "eos_token_id": [7, 9], "pad_token_id": None}
    assert merged.generation_json() == {
        "bos_token_id": 3,
        "eos_token_id": [7, 9],
        "temperature": 0.6,
    }
    assert stored.with_ids({"eos_token_id": 5}).ids["eos_token_id"] == 5


@pytest.mark.parametrize("kind", ["transformers", "tokenizers"])
def test_save_pretrained_writes_the_tokenizer(checkpoints, kind, tmp_path):
    """A transformers tokenizer is saved as is; a tokenizers.Tokenizer is wrapped with the
    model's bos/eos/pad tokens. AutoTokenizer opens the folder with the same ids."""
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = backend
    if kind == "transformers":
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    folder, _ = checkpoints["llama"]
    model = GPTLMHeadModel.from_pretrained(folder, backend="torch")
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    reopened = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reopened("w1 w5 w9").input_ids == backend.encode("w1 w5 w9").ids
    special = (reopened.bos_token_id, reopened.eos_token_id, reopened.pad_token_id)
    assert special == (COMMON["bos_token_id"], COMMON["eos_token_id"], COMMON["pad_token_id"])


def test_loss_matches_hf(checkpoints):
    folder, hf = checkpoints["gpt2"]
    model = GPTLMHeadModel.from_pretrained(folder, backend="torch").eval()
    ids = _ids()
    labels = ids.clone()
    labels[0, 5] = -100
    with torch.no_grad():
        expected = hf(ids, labels=labels).loss
        loss = model(ids, labels=labels).loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        GPTLMHeadModel.from_pretrained(tmp_path)


def test_missing_and_unexpected_weights(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = checkpoints["gpt2"]
    state = load_file(str(folder / "model.safetensors"))
    state.pop("transformer.h.1.mlp.c_fc.bias")
    state["transformer.h.0.extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing weights \['transformer.h.1.mlp.fc1.bias'\]"):
        GPTLMHeadModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unexpected weights.*extra.weight"):
        GPTLMHeadModel.from_pretrained(tmp_path)


def test_bad_folder(checkpoints, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="lacks the field 'vocab_size'"):
        GPTLMHeadModel.from_pretrained(tmp_path)
    folder, _ = checkpoints["gpt2"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPTLMHeadModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "arch",
    [
        dict(),
        dict(
            norm_type="rmsnorm",
            gated_mlp=True,
            activation="silu",
            rotary_emb_fraction=1.0,
            n_head_kv=2,
            qkv_proj_bias=False,
            out_proj_bias=False,
            mlp_fc1_bias=False,
            mlp_fc2_bias=False,
            tie_word_embeddings=False,
        ),
    ],
)
def test_model_trained_here_opens_in_transformers(arch, tmp_path):
    from flash_attn.models.gpt import GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, **arch)
    model = GPTLMHeadModel(config).eval()
    _assert_reopened_matches(model, tmp_path, model, atol=1e-4)


def test_save_pretrained_rejects_other_layouts(tmp_path):
    from flash_attn.models.gpt import GPTConfig

    # a gated MLP with LayerNorm: no family has both
    model = GPTLMHeadModel(
        GPTConfig(
            n_layer=1,
            n_embd=32,
            n_head=2,
            vocab_size=VOCAB,
            gated_mlp=True,
            rotary_emb_fraction=0.5,
        )
    )
    with pytest.raises(ValueError, match=r"no Hugging Face layout(.|\n)*GPT-2.*gated_mlp=True"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="OPT layout cannot hold this model: .*gated_mlp=True"):
        model.save_pretrained(tmp_path, family="opt")
    with pytest.raises(ValueError, match="family must be one of"):
        model.save_pretrained(tmp_path, family="bert")


def test_pytorch_bin_and_sharded_checkpoints(checkpoints, tmp_path):
    """pytorch_model.bin (read with weights_only=True) and sharded safetensors load alike."""
    folder, hf = checkpoints["llama"]
    bin_folder, sharded = tmp_path / "bin", tmp_path / "sharded"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), bin_folder / "pytorch_model.bin")
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        for path in (bin_folder, sharded):
            model = GPTLMHeadModel.from_pretrained(path, backend="torch").eval()
            torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)


def test_from_pretrained_dtype(checkpoints):
    folder, hf = checkpoints["gpt2"]
    model = GPTLMHeadModel.from_pretrained(folder, dtype=torch.bfloat16, backend="torch").eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits
        expected = hf(ids).logits
    assert logits.dtype == torch.bfloat16
    # bf16 weights and activations: a loose bound, still far below the logits' spread.
    assert (logits.float() - expected).abs().max() < 0.1 * expected.std()


def test_config_json_names_the_dtype_as_transformers_does(tmp_path):
    """config.json holds the weights' dtype under the key transformers itself writes."""
    from flash_attn.models.gpt import GPTConfig

    config = GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16)
    GPTLMHeadModel(config).to(torch.bfloat16).save_pretrained(tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype="auto")
    assert hf.dtype == torch.bfloat16
    hf.save_pretrained(tmp_path / "theirs")
    ours, theirs = (
        json.loads((tmp_path / f / "config.json").read_text()) for f in ("ours", "theirs")
    )
    assert {k for k in ours if "dtype" in k} == {k for k in theirs if "dtype" in k} == {"dtype"}
    assert ours["dtype"] == theirs["dtype"] == "bfloat16"
