"""The READMEs' Python runs as written, on the CPU at the sizes they show.

Every ```python block of README.md and training/README.md is run in a fresh namespace, in a
temporary working folder. An HTML comment on the line above a block says what it needs:

    <!-- readme-test: given path, input_ids -->   the test defines these names first
    <!-- readme-test: skip: needs a CUDA GPU -->   the block is skipped with that reason

Besides the blocks, every import line in the text (``from flash_attn.modules import MHA``)
is run and every dotted ``flash_attn`` name (``flash_attn.modules.norm.RMSNorm``) resolves.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "training" / "README.md"]
_MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<what>given|skip)\s*:?\s*(?P<rest>.*?)\s*-->")
_IMPORT = re.compile(r"^(?:from\s+flash_attn[\w.]*\s+import\s+[\w, ]+|import\s+flash_attn[\w.]*)$")
_DOTTED = re.compile(r"^flash_attn(?:\.\w+)+$")


def python_blocks(path: Path) -> list[tuple[str, str, dict]]:
    """("file:line", code, marker) of each ```python block; marker is {} or
    {"given": [names]} or {"skip": reason} from the HTML comment on the line above."""
    lines = path.read_text().splitlines()
    blocks, start = [], None
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if start is None and stripped == "```python":
            start = number
        elif start is not None and stripped == "```":
            marker = _MARKER.search(lines[start - 2]) if start > 1 else None
            what = {}
            if marker and marker["what"] == "given":
                what = {"given": [n.strip() for n in marker["rest"].split(",") if n.strip()]}
            elif marker:
                what = {"skip": marker["rest"] or "marked in the README"}
            code = "\n".join(lines[start : number - 1])
            blocks.append((f"{path.relative_to(ROOT)}:{start}", code, what))
            start = None
    return blocks


def inline_code(path: Path) -> list[str]:
    """The text of every inline code span and every line of every fenced block."""
    spans = re.findall(r"`([^`\n]+)`", path.read_text())
    code_lines = [line.strip() for _, code, _ in python_blocks(path) for line in code.split("\n")]
    return [s.strip() for s in spans] + code_lines


BLOCKS = [block for path in READMES for block in python_blocks(path)]
IMPORTS = sorted({s for path in READMES for s in inline_code(path) if _IMPORT.match(s)})
DOTTED = sorted({s for path in READMES for s in inline_code(path) if _DOTTED.match(s)})


def _tiny_llama_folder(folder: Path) -> str:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


# name a block may be given -> how the test makes it (from a temporary folder)
GIVEN = {
    "path": lambda tmp: _tiny_llama_folder(tmp / "tiny-llama"),
    "input_ids": lambda tmp: torch.randint(0, 128, (2, 16)),  # (batch, seqlen)
}


def test_the_readmes_have_python():
    assert len(BLOCKS) >= 3 and len(IMPORTS) >= 2 and len(DOTTED) >= 10


@pytest.mark.parametrize("where, code, marker", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_python_block_runs(where, code, marker, tmp_path, monkeypatch):
    if "skip" in marker:
        pytest.skip(f"{where}: {marker['skip']}")
    unknown = set(marker.get("given", ())) - set(GIVEN)
    assert not unknown, f"{where} is given {unknown}, which {__file__} does not define"
    namespace = {"__name__": "__readme__"}
    namespace.update({name: GIVEN[name](tmp_path) for name in marker.get("given", ())})
    monkeypatch.chdir(tmp_path)  # files a block writes ("out/") land here
    exec(compile(code, where, "exec"), namespace)


@pytest.mark.parametrize("line", IMPORTS)
def test_import_line_runs(line):
    exec(line, {})


@pytest.mark.parametrize("name", DOTTED)
def test_dotted_name_resolves(name):
    parts = name.split(".")
    for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            assert hasattr(obj, attribute), f"{name}: {obj.__name__} has no {attribute!r}"
            obj = getattr(obj, attribute)
        return
    pytest.fail(f"{name}: no module of it imports")
