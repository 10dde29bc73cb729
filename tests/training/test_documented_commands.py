"""Every ``python train.py ...`` command the documentation writes composes as written.

The commands are read from README.md, training/README.md and the comments of configs/, so a
command added there is covered without touching this file. A command is ``python``,
``torchrun`` or ``srun`` ... ``train.py`` followed by overrides, in a fenced code block, an
inline code span or a YAML comment (lines ending in ``\\`` continue); it ends at the first word
that is not an override (the prose after it). ``<placeholder>`` values become a dummy value.
"""

from __future__ import annotations

import re
import shlex

import pytest
from omegaconf import OmegaConf
from training_testing import CONFIG_DIR, ROOT, compose_config

_COMMAND = re.compile(r"\b(?:python3?|torchrun|srun)\b.*?(?<![\w/.-])train\.py\b(?P<args>.*)")
_OVERRIDE = re.compile(r"^(?:[+~]{1,2})?[A-Za-z_][\w.@/-]*=|^~[A-Za-z_][\w.@/-]*$")
_PLACEHOLDER_VALUE = re.compile(r"(?<==)<[^<>]*>")
_PLACEHOLDER = re.compile(r"<[^<>]*>")


def _joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(number of the first line, text) of lines with their ``\\`` continuations appended."""
    out, start, pending = [], None, ""
    for number, line in lines:
        start = start or number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        start, pending = None, ""
    return out + ([(start, pending)] if pending else [])


def markdown_texts(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each code line (continuations joined) and inline code span."""
    texts, block, in_block = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if in_block:
                texts += _joined(block)
            in_block, block = not in_block, []
        elif in_block:
            block.append((number, line))
        else:
            texts += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return texts


def yaml_comment_texts(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each comment of a YAML file (continuations joined)."""
    lines = enumerate(text.splitlines(), 1)
    return _joined([(number, line.split("#", 1)[1]) for number, line in lines if "#" in line])


def command_overrides(text: str) -> list[str] | None:
    """The overrides of the train.py command in text (None when it has none)."""
    match = _COMMAND.search(text)
    if match is None:
        return None
    args = _PLACEHOLDER.sub("", _PLACEHOLDER_VALUE.sub("PLACEHOLDER", match["args"]))
    lexer = shlex.shlex(args, posix=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    overrides = []
    for word in lexer:
        if not _OVERRIDE.match(word):
            break
        overrides.append(word)
    return overrides


def documented_commands() -> list[tuple[str, list[str]]]:
    """("file:line", overrides) of every train.py command in the documentation."""
    sources = [ROOT / "README.md", ROOT / "training" / "README.md"]
    sources += sorted(CONFIG_DIR.rglob("*.yaml"))
    commands = []
    for path in sources:
        text = path.read_text()
        texts = markdown_texts(text) if path.suffix == ".md" else yaml_comment_texts(text)
        for number, snippet in texts:
            overrides = command_overrides(snippet)
            if overrides is not None:
                commands.append((f"{path.relative_to(ROOT)}:{number}", overrides))
    return commands


COMMANDS = documented_commands()


def test_commands_are_found():
    """The extraction finds the commands it is meant to (a guard against a silent empty list)."""
    found = {" ".join(overrides) for _, overrides in COMMANDS}
    assert "experiment=gpt2" in found
    assert any(c.startswith("ckpt_path=last hydra.run.dir=") for c in found)
    assert "trainer=ddp trainer.num_nodes=N hydra.run.dir=outputs/my_run" in found  # torchrun
    assert sum(where.startswith("configs/") for where, _ in COMMANDS) >= 4


def test_extraction_of_one_line():
    line = "python train.py ckpt_path=last hydra.run.dir=<run folder>    # resume exactly"
    assert command_overrides(line) == ["ckpt_path=last", "hydra.run.dir=PLACEHOLDER"]
    prose = "python train.py experiment=finetune model.pretrained=gpt2 (hub id, or a folder)"
    assert command_overrides(prose) == ["experiment=finetune", "model.pretrained=gpt2"]
    files = "{train: /a/*.jsonl, validation: /b.jsonl}"
    quoted = f"python train.py data.source.data_files='{files}'"
    assert command_overrides(quoted) == [f"data.source.data_files={files}"]
    assert command_overrides("see training/train.py for train(cfg)") is None


@pytest.mark.parametrize("where, overrides", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_composes(where, overrides, tmp_path):
    if not any(o.startswith("paths.output_dir=") for o in overrides):
        overrides = [*overrides, f"paths.output_dir={tmp_path}"]
    cfg = compose_config(overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves


DATA_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))


def _keys(node, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        keys.add(prefix + key)
        if OmegaConf.is_dict(value):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def test_data_configs_have_the_same_keys(tmp_path):
    """Any data.* override that one data config takes, every data config takes."""
    keys = {}
    for name in DATA_CONFIGS:
        cfg = compose_config([f"data={name}", f"paths.output_dir={tmp_path}"])
        keys[name] = _keys(cfg.data)
    assert len({frozenset(k) for k in keys.values()}) == 1, keys


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_streaming_and_document_mask_on_every_data_config(name, tmp_path):
    cfg = compose_config(
        [
            f"data={name}",
            "data.streaming=true",
            "data.document_mask=true",
            "data.source.data_files=notes.txt",
            f"paths.output_dir={tmp_path}",
        ]
    )
    assert cfg.data.streaming is True and cfg.data.document_mask is True


def test_hub_data_switches_to_local_files_keeping_its_recipe(tmp_path):
    """The pile/openwebtext configs read a local copy with data.source.kind=files, keeping
    GPT-2's tokenizer, the context and streaming."""
    data_files = "{train: /data/train/*.jsonl.zst, validation: /data/val.jsonl.zst}"
    cfg = compose_config(
        [
            "experiment=gpt3-125m",
            "data.source.kind=files",
            f"data.source.data_files={data_files}",
            f"paths.output_dir={tmp_path}",
        ]
    )
    assert cfg.data.source.kind == "files" and cfg.data.tokenizer.name == "gpt2"
    assert cfg.data.seq_len == 2048 and cfg.data.streaming is True
    assert dict(cfg.data.source.data_files) == {
        "train": "/data/train/*.jsonl.zst",
        "validation": "/data/val.jsonl.zst",
    }
