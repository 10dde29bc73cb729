"""flash_attn.integrations.transformers on tiny random models (2 layers, hidden 64), CPU only.

Logits, loss and gradients use the 2x-error criterion against an fp64 eager model. Batching
tests (padding, packing, generation) compare fp32 models with assert_close at 1e-5: a 2-layer
model of width 64 over at most 16 tokens differs by summation order only, around 1e-7.
"""

import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flash_attn.integrations import transformers as fa  # noqa: E402

VOCAB = 128
# fmt: off
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4)
GQA = dict(SIZES, num_key_value_heads=2)
CONFIGS = {  # family -> (config class, arguments): sliding windows and softcaps are exercised
    "llama": ("LlamaConfig", GQA),
    "mistral": ("MistralConfig", dict(GQA, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(GQA, use_sliding_window=True, sliding_window=4,
                                max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=2.0)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                eos_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict(SIZES, rotary_pct=0.5)),
}
# fmt: on


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> folder of a tiny random model saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    for name, (config_class, arguments) in CONFIGS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**arguments)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
    return {name: root / name for name in CONFIGS}


def load(path, attn="eager", dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn, dtype=dtype
    )
    return model.eval()


def load_ours(path, mode):
    """mode "attention": our attention only; "fused": apply_fused_ops (every op)."""
    if mode == "attention":
        return load(path, attn="flash_attn_triton")
    return fa.apply_fused_ops(load(path))


def assert_twice_eager_error(ours, eager, exact, atol=1e-6):
    """ours and eager (fp32) against exact (fp64): ours' error at most 2x eager's + atol."""
    ours_error = (ours.double() - exact).abs().max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    assert ours_error <= 2 * eager_error + atol, (ours_error, eager_error)


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["attention", "fused"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_logits_loss_grads_match_eager(saved, family, mode):
    ids = torch.randint(0, VOCAB, (2, 11))
    eager, exact = load(saved[family]), load(saved[family], dtype=torch.float64)
    ours = load_ours(saved[family], mode)
    with torch.no_grad():
        assert_twice_eager_error(ours(ids).logits, eager(ids).logits, exact(ids).logits)
    ours_loss, ours_grads = loss_and_grads(ours, ids)
    eager_loss, eager_grads = loss_and_grads(eager, ids)
    exact_loss, exact_grads = loss_and_grads(exact, ids)
    assert_twice_eager_error(ours_loss, eager_loss, exact_loss)
    assert ours_grads.keys() == exact_grads.keys()
    for name, grad in exact_grads.items():
        # atol: a gradient entry sums over 22 tokens x up to 128 features in fp32
        assert_twice_eager_error(ours_grads[name], eager_grads[name], grad, atol=1e-5)
    if mode == "fused":
        assert ours(ids, labels=ids).logits is None  # the loss never built the logits


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_left_padded_batch(saved, family):
    ids = torch.randint(0, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, :1] = 0, 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = load(saved[family])(ids, attention_mask=mask, position_ids=position_ids).logits
        for mode in ("attention", "fused"):
            ours = load_ours(saved[family], mode)
            got = ours(ids, attention_mask=mask, position_ids=position_ids).logits
            valid = mask.bool()
            torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_batch_equals_each_sequence_alone(saved, family, monkeypatch):
    varlen_calls = []
    varlen = fa.flash_attn_varlen_func
    monkeypatch.setattr(
        fa, "flash_attn_varlen_func", lambda *a, **k: varlen_calls.append(1) or varlen(*a, **k)
    )
    lengths = [5, 7, 4]
    sequences = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(sequences, dim=1)  # (1, 16), no padding
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    eager = load(saved[family])
    for mode in ("attention", "fused"):
        ours = load_ours(saved[family], mode)
        with torch.no_grad():
            got = ours(packed, position_ids=position_ids).logits.split(lengths, dim=1)
            for sequence, logits in zip(sequences, got):
                torch.testing.assert_close(logits, eager(sequence).logits, atol=1e-5, rtol=1e-5)
    assert len(varlen_calls) == 2 * 2  # two layers, two modes: the varlen kernel ran


@pytest.mark.parametrize("mode", ["attention", "fused"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_custom_4d_mask_as_eager(saved, family, mode):
    """A custom 4-D mask (here two documents in each row, one row also hiding a key) goes
    through our masked path: float (added to the scores, as eager adds it) or bool (True where
    attention is allowed) give eager's logits with the float mask."""
    ids = torch.randint(0, VOCAB, (2, 9))
    same_document = (torch.arange(9) < 4)[:, None] == (torch.arange(9) < 4)[None, :]
    allowed = torch.tril(torch.ones(9, 9, dtype=torch.bool)) & same_document
    allowed = allowed[None, None].repeat(2, 1, 1, 1)  # (B, 1, T, T)
    allowed[1, :, 6:, 5] = False
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    eager, ours = load(saved[family]), load_ours(saved[family], mode)
    with torch.no_grad():
        expected = eager(ids, attention_mask=additive).logits
        for mask in (additive, allowed):
            got = ours(ids, attention_mask=mask).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


BAD_MASKS_AND_POSITIONS = [
    (dict(attention_mask=torch.ones(1, 6, 6)), r"attention_mask must be a \(batch, seqlen\)"),
    (dict(attention_mask=torch.ones(1, 1, 5, 6, dtype=torch.bool)), "4-D attention_mask"),
    (dict(attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.long)), "4-D attention_mask"),
    (dict(position_ids=torch.tensor([[3, 4, 5, 0, 1, 2]])), "position_ids of a packed batch"),
]


@pytest.mark.parametrize("inputs, message", BAD_MASKS_AND_POSITIONS)
def test_bad_attention_mask_or_position_ids_is_named(saved, inputs, message):
    """eager refuses a 3-D mask too; a packed batch's sequences start where position_ids is 0,
    so positions that start elsewhere name position_ids instead of a cu_seqlens error."""
    ours = load_ours(saved["llama"], "attention")
    with pytest.raises((ValueError, TypeError), match=message):
        ours(torch.randint(0, VOCAB, (1, 6)), **inputs)


WRONG_POSITION_IDS = {
    "packed, one short": [[0, 1, 2, 0, 1]],
    "packed, one long": [[0, 1, 2, 0, 1, 2, 3]],
    "no batch dimension": [0, 1, 2, 3, 4, 5],
    "batch of 2 for 1": [[0, 1, 2, 3, 4, 5]] * 2,
}


@pytest.mark.parametrize("mode", ["attention", "fused"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", WRONG_POSITION_IDS.values(), ids=WRONG_POSITION_IDS.keys())
def test_position_ids_not_matching_the_tokens_are_named(saved, family, mode, positions):
    """Positions of another length fail in transformers' rotary (or position) embedding, before
    our attention sees them; the model checks their shape first, given by keyword or position,
    with input_ids or inputs_embeds."""
    ours = load_ours(saved[family], mode)
    ids, position_ids = torch.randint(0, VOCAB, (1, 6)), torch.tensor(positions)
    expected = r"position_ids must have shape \(batch, sequence length\) = \(1, 6\)"
    with pytest.raises(ValueError, match=expected + r", one position per token of input_ids"):
        ours(ids, position_ids=position_ids)
    index = list(inspect.signature(ours.forward).parameters).index("position_ids")
    with pytest.raises(ValueError, match=expected):
        ours(ids, *[None] * (index - 1), position_ids)
    embeds = ours.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match=expected + r", one position per token of inputs_embeds"):
        ours(inputs_embeds=embeds, position_ids=position_ids)


@pytest.mark.parametrize("mode", ["attention", "fused"])
def test_position_ids_shared_by_the_batch(saved, mode):
    """(1, T) positions for a batch of B, as transformers broadcasts them, still run."""
    ids, position_ids = torch.randint(0, VOCAB, (2, 7)), torch.arange(7)[None]
    with torch.no_grad():
        expected = load(saved["llama"])(ids, position_ids=position_ids).logits
        got = load_ours(saved["llama"], mode)(ids, position_ids=position_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox"])
def test_greedy_generate_matches_eager(saved, family):
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = load(saved[family]).generate(ids, **options)
    for mode in ("attention", "fused"):
        assert torch.equal(load_ours(saved[family], mode).generate(ids, **options), expected)


def test_save_pretrained_after_patching_reloads_unpatched(saved, tmp_path):
    ids = torch.randint(0, VOCAB, (2, 7))
    eager = load(saved["llama"])
    fused = fa.apply_fused_ops(load(saved["llama"]))
    assert fused.state_dict().keys() == eager.state_dict().keys()
    fused.save_pretrained(tmp_path)
    reloaded = load(tmp_path)
    assert reloaded.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, eager(ids).logits, atol=0, rtol=0)


def _train_losses(model, batches, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for ids in batches[:steps]:
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_peft_lora_steps_match_eager(saved):
    peft = pytest.importorskip("peft")
    batches = [torch.randint(0, VOCAB, (2, 12)) for _ in range(3)]
    # LoRA on the MLP too: the fused MLP then runs transformers' forward around the adapters
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    losses = []
    for model in (load(saved["llama"]), fa.apply_fused_ops(load(saved["llama"]))):
        torch.manual_seed(1)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
        losses.append(_train_losses(peft.get_peft_model(model, lora), batches))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


def test_trainer_steps_match_eager(saved, tmp_path):
    pytest.importorskip("accelerate")
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, 12))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    losses = []
    for model in (load(saved["llama"]), fa.apply_fused_ops(load(saved["llama"]))):
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
    assert len(losses[0]) == 2
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)


def test_unsupported_family_lists_the_supported_ones():
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="gpt_neox.*llama.*'opt'"):
        fa.apply_fused_ops(model)


def test_unpatchable_part_changes_nothing(saved):
    model = load(saved["gemma2"])
    model.config.hidden_activation = "quick_gelu"  # no fused MLP kernel computes it
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match="quick_gelu"):
        fa.apply_fused_ops(model)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.config._attn_implementation == "eager"
    fa.apply_fused_ops(model, mlp=False)  # everything else can be patched


def test_importing_flash_attn_does_not_import_transformers():
    code = (
        "import sys, flash_attn, flash_attn.integrations; assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
