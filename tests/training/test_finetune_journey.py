"""From a Hugging Face folder to a Hugging Face folder: finetune a tiny local Llama and GPT-2 on
one .txt file on the CPU, then open <run>/hf in transformers and with scripts/generate.py, and
export a checkpoint with scripts/export_hf.py."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from training_testing import ROOT, compose_config

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from training.hf_export import CHECKPOINT_KEY
from training.train import train

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# the words of the tiny word-level tokenizer, after its special tokens
VOCABULARY = "the of and to in is was flash attention kernel block tile softmax query key value"
WORDS = VOCABULARY.split()
# family -> (special tokens in id order, bos, eos, pad); sizes match debug=tiny.
SPECIALS = {"llama": ["<unk>", "<s>", "</s>"], "gpt2": ["<|endoftext|>"]}
SPECIAL_IDS = {"llama": (1, 2, None), "gpt2": (0, 0, None)}


def _hf_folder(folder, family: str):
    """A tiny random transformers model with a word-level tokenizer, saved in folder."""
    specials = SPECIALS[family]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=specials[0]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    bos, eos, pad = SPECIAL_IDS[family]
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=backend.id_to_token(bos),
        eos_token=backend.id_to_token(eos),
    )
    ids = dict(vocab_size=len(vocab), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=64,
            **ids,
        )
    else:
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _text_file(path):
    """One .txt file: 60 paragraphs separated by blank lines."""
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(60)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trained_model(checkpoint) -> GPTLMHeadModel:
    """Our model with the weights of a training checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = GPTLMHeadModel(GPTConfig(**state[CHECKPOINT_KEY]["config"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()})
    return model.eval()


@torch.no_grad()
def _assert_same_logits(folder, model: GPTLMHeadModel):
    reopened = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(reopened(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    return reopened


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def finetuned(request, tmp_path_factory):
    """(family, original tokenizer, run folder, summary) of a 3-step finetune of a tiny HF
    folder on one .txt file, on the CPU, with gradient accumulation."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    tokenizer = _hf_folder(root / "pretrained", family)
    run = root / "run"
    cfg = compose_config(
        [
            "experiment=finetune",
            "debug=tiny",
            "data=files",
            f"data.source.data_files={_text_file(root / 'notes.txt')}",
            f"model.pretrained={root / 'pretrained'}",
            f"paths.cache_dir={root / 'cache'}",
            f"paths.output_dir={run}",
            "logger=none",
            "trainer.max_steps=3",
            "global_batch_size=4",
            "callbacks.progress_bar={_target_:training.progress.StepProgressBar,refresh_rate:1}",
        ]
    )
    summary = train(cfg)
    return family, tokenizer, run, summary


def test_finetune_ends_with_a_hugging_face_folder(finetuned):
    family, tokenizer, run, summary = finetuned
    assert summary["global_step"] == 3
    hf = run / "hf"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (hf / name).is_file(), name
    reopened = _assert_same_logits(hf, _trained_model(run / "checkpoints" / "last.ckpt"))
    bos, eos, pad = SPECIAL_IDS[family]
    assert (reopened.config.bos_token_id, reopened.config.eos_token_id) == (bos, eos)
    assert reopened.generation_config.eos_token_id == eos
    reopened_tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    text = "flash attention kernel"
    assert reopened_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert reopened_tokenizer.eos_token_id == eos
    summary_text = (run / "summary.txt").read_text()
    assert str(hf) in summary_text and "sample" in summary_text


def test_generate_script_runs_on_the_run_folder(finetuned):
    _, _, run, _ = finetuned
    generate = _load_script("generate")
    options = ["--max-new-tokens", "5", "--top-k", "1"]
    text = generate.main(["--checkpoint", str(run / "hf"), "--prompt", "the kernel", *options])
    assert text.startswith("the kernel")
    with pytest.raises(ValueError, match="--max-new-tokens"):
        generate.main(
            ["--checkpoint", str(run / "hf"), "--prompt", "the", "--max_new_tokens", "64"]
        )


def test_export_script_writes_the_same_folder(finetuned, tmp_path):
    family, _, run, _ = finetuned
    if family != "llama":
        pytest.skip("one family is enough: the export path does not depend on it")
    from safetensors.torch import load_file

    checkpoint = run / "checkpoints" / "last.ckpt"
    _load_script("export_hf").main([str(checkpoint), str(tmp_path / "out")])
    exported, ended = (
        load_file(str(f / "model.safetensors")) for f in (tmp_path / "out", run / "hf")
    )
    assert exported.keys() == ended.keys()
    assert all(torch.equal(exported[k], ended[k]) for k in ended)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").eos_token_id == 2

    # A checkpoint that carries no export settings: the error says what to pass.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del state[CHECKPOINT_KEY]
    torch.save(state, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="--tokenizer"):
        _load_script("export_hf").main([str(tmp_path / "old.ckpt"), str(tmp_path / "old")])
    _load_script("export_hf").main(
        [str(tmp_path / "old.ckpt"), str(tmp_path / "old"), "--tokenizer", str(run / "hf")]
    )
    _assert_same_logits(tmp_path / "old", _trained_model(checkpoint))


def test_finetune_runs_on_the_device_that_exists(tmp_path):
    cfg = compose_config(["experiment=finetune", f"paths.output_dir={tmp_path}"])
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.precision in (32, "32")
