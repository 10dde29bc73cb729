"""The layout of ``flash_attn``: imports point down the layers, no two packages import each
other, kernels import only what a kernel needs, and the official import paths only re-export.

The layers, top to bottom; a module imports its own layer and the layers below it:

    0  official paths and adapters: flash_attn/__init__, layers/, losses/, ops/triton/,
       utils/generation, integrations/
    1  models/
    2  modules/
    3  the functional attention API: flash_attn_interface, bert_padding (what modules build
       on, as in flash-attn 2.x)
    4  ops: each ops/<op>/ package (api, function, reference, ...)
    5  kernels: ops/<op>/triton/
    6  shared helpers: ops/launch, ops/backend, ops/custom_op, utils/checks

Imports are read from the source (every ``import``, also inside functions). An import inside
a module-level ``__getattr__`` runs on first use of a name, not at import time: it is allowed
to reach up only where :data:`DEFERRED_UP` says why.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flash_attn"

# (pattern over dotted module names, layer): the first pattern that matches gives the layer.
LAYERS = [
    ("flash_attn", 0),
    ("flash_attn.layers*", 0),
    ("flash_attn.losses*", 0),
    ("flash_attn.ops.triton*", 0),
    ("flash_attn.utils.generation", 0),
    ("flash_attn.integrations*", 0),
    ("flash_attn.models*", 1),
    ("flash_attn.modules*", 2),
    ("flash_attn.flash_attn_interface", 3),
    ("flash_attn.bert_padding", 3),
    ("flash_attn.ops", 6),
    ("flash_attn.ops.launch", 6),
    ("flash_attn.ops.backend", 6),
    ("flash_attn.ops.custom_op", 6),
    ("flash_attn.ops.plans", 6),
    ("flash_attn.utils", 6),
    ("flash_attn.utils.checks", 6),
    ("flash_attn.ops.*.triton*", 5),
    ("flash_attn.ops.*", 4),
]
KERNELS = 5
# What a kernel module may import besides the standard library, its own triton/ folder and
# its op's options (a dataclass of plain values).
KERNEL_IMPORTS = {
    "torch",
    "triton",
    "flash_attn.ops.launch",
    "flash_attn.ops.plans",
    "flash_attn.ops.backend",
}
KERNEL_RULE = (
    "torch, triton, the standard library, its triton/ folder, its op's options and "
    "flash_attn.ops.launch / plans / backend only"
)
# Files at the official import paths of flash-attn 2.x: a docstring, imports and __all__.
REEXPORTS = [
    "layers/__init__.py",
    "layers/rotary.py",
    "losses/__init__.py",
    "losses/cross_entropy.py",
    "ops/triton/__init__.py",
    "ops/triton/cross_entropy.py",
    "ops/triton/layer_norm.py",
    "ops/triton/rotary.py",
    "utils/generation.py",
]
# (module, import) -> why an import inside __getattr__ reaches up.
DEFERRED_UP = {
    ("flash_attn.ops.cross_entropy", "flash_attn.modules.losses"): (
        "CrossEntropyLoss and CrossEntropyOptions lived here before modules/losses.py"
    ),
    ("flash_attn.ops.linear_cross_entropy", "flash_attn.modules.losses"): (
        "LinearCrossEntropyLoss lived here before modules/losses.py"
    ),
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a package's __init__ goes by the package's name)
    line: int
    deferred: bool  # inside a module-level __getattr__


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under root (a package named after its folder)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict) -> list[Import]:
    """The imports of the module ``name`` of ``modules`` that stay inside the package root,
    and the top-level names of the others (``torch``, ``os``), as :class:`Import` rows."""
    tree = ast.parse(path.read_text(), str(path))
    deferred_lines = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            deferred_lines |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` imports the module; `from module import name` the module
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target not in modules:
                target = target.split(".")[0]  # outside the package: its top-level name
            found.append(Import(name, target, node.lineno, node.lineno in deferred_lines))
    return found


def all_imports(root: Path) -> list[Import]:
    modules = module_names(root)
    return [row for name, path in modules.items() for row in imports_of(name, path, modules)]


def layer_of(name: str) -> int:
    for pattern, layer in LAYERS:
        if fnmatch.fnmatchcase(name, pattern):
            return layer
    raise AssertionError(f"{name} is in no layer of {__file__}: add it to LAYERS")


def op_of(name: str) -> str | None:
    """flash_attn.ops.<op> for a module of an op package (its triton/ included), else None."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[:2] == ["flash_attn", "ops"] and layer_of(name) in (4, KERNELS):
        return ".".join(parts[:3])
    return None


def upward_imports(rows: list[Import]) -> list[str]:
    """Imports from a module to a layer above its own, kernels importing what a kernel does
    not need, and kernels imported from outside their op package, as readable lines."""
    problems = []
    for row in rows:
        where = f"{row.source}:{row.line} imports {row.target}"
        if layer_of(row.source) == KERNELS:  # a rule of their own, which options.py passes
            if not _kernel_may_import(row):
                problems.append(f"{where}: a kernel imports {KERNEL_RULE}")
        elif not _inside(row.target):
            continue
        elif layer_of(row.target) == KERNELS and op_of(row.source) != op_of(row.target):
            problems.append(f"{where}: another op's kernels (go through its package)")
        elif _upward(row) and not (row.deferred and (row.source, row.target) in DEFERRED_UP):
            problems.append(
                f"{where}: layer {layer_of(row.source)} -> {layer_of(row.target)} (upward)"
            )
    return problems


def _inside(name: str) -> bool:
    return name == "flash_attn" or name.startswith("flash_attn.")


def _upward(row: Import) -> bool:
    return _inside(row.target) and layer_of(row.target) < layer_of(row.source)


def _kernel_may_import(row: Import) -> bool:
    top = row.target.split(".")[0]
    if top != "flash_attn":
        return top in KERNEL_IMPORTS or top in sys.stdlib_module_names or top == "__future__"
    own = op_of(row.source)
    return row.target in KERNEL_IMPORTS or (
        row.target.startswith(f"{own}.triton") or row.target == f"{own}.options"
    )


def package_of(name: str) -> str:
    """The node of the package graph: one per op package (flash_attn.ops.<op>, its triton/
    included), else flash_attn.<folder> (ops/'s shared modules are flash_attn.ops); a top-level
    file, and an official path that sits in another layer's folder (ops/triton/,
    utils/generation), count on their own."""
    parts = name.split(".")
    if op_of(name):
        return op_of(name)
    if len(parts) <= 2 or layer_of(name) != layer_of(".".join(parts[:2])):
        return name
    return ".".join(parts[:2])


def package_cycles(rows: list[Import]) -> list[list[str]]:
    """Cycles of the graph package -> packages it imports at import time (deferred imports
    left out), each as the list of its packages."""
    graph: dict[str, set[str]] = {}
    for row in rows:
        if row.deferred or not _inside(row.target):
            continue
        source, target = package_of(row.source), package_of(row.target)
        if source != target:
            graph.setdefault(source, set()).add(target)
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


ROWS = all_imports(PACKAGE)


def test_every_module_has_a_layer():
    for name in module_names(PACKAGE):
        layer_of(name)


def test_imports_point_down():
    assert upward_imports(ROWS) == []


def test_no_import_cycle_between_packages():
    assert package_cycles(ROWS) == []


def test_deferred_upward_imports_are_the_listed_ones():
    deferred_up = {(row.source, row.target) for row in ROWS if row.deferred and _upward(row)}
    assert deferred_up == set(DEFERRED_UP)


@pytest.mark.parametrize("relative", REEXPORTS)
def test_official_paths_only_reexport(relative):
    tree = ast.parse((PACKAGE / relative).read_text())
    for i, node in enumerate(tree.body):
        docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        names = isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
        assert docstring or names or isinstance(node, (ast.Import, ast.ImportFrom)), (
            f"{relative}:{node.lineno}: an official path holds imports and __all__ only"
        )


# (module, name, where it lives now): names that moved keep their old import path.
MOVED = [
    ("flash_attn.ops.cross_entropy", "CrossEntropyLoss", "flash_attn.modules.losses"),
    ("flash_attn.ops.cross_entropy", "CrossEntropyOptions", "flash_attn.modules.losses"),
    ("flash_attn.ops.linear_cross_entropy", "LinearCrossEntropyLoss", "flash_attn.modules.losses"),
    ("flash_attn.utils.generation", "InferenceParams", "flash_attn.models.generation"),
    ("flash_attn.utils.generation", "generate", "flash_attn.models.generation"),
    ("flash_attn.utils.generation", "sample", "flash_attn.models.generation"),
]


@pytest.mark.parametrize("module, name, home", MOVED, ids=[f"{m}.{n}" for m, n, _ in MOVED])
def test_moved_names_keep_their_old_path(module, name, home):
    moved = getattr(importlib.import_module(module), name)
    assert moved is getattr(importlib.import_module(home), name)


# -- the checker itself, on a small package written for the purpose -----------------------------


def _write(root: Path, files: dict[str, str]) -> list[Import]:
    for relative, source in files.items():
        path = root / "flash_attn" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return all_imports(root / "flash_attn")


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    rows = _write(
        tmp_path,
        {
            "__init__.py": "",
            "modules/__init__.py": "",
            "modules/norm.py": "from flash_attn.ops.norm import norm\n",
            "ops/__init__.py": "",
            "ops/norm/__init__.py": "from flash_attn.ops.norm.api import norm\n",
            "ops/norm/api.py": "def norm():\n    from flash_attn.modules import norm\n",
        },
    )
    problems = upward_imports(rows)
    assert (
        len(problems) == 1
        and "flash_attn.ops.norm.api:2 imports flash_attn.modules.norm" in (problems[0])
    )
    assert package_cycles(rows) == [
        ["flash_attn.modules", "flash_attn.ops.norm", "flash_attn.modules"]
    ]


def test_the_checker_holds_kernels_to_torch_and_triton(tmp_path):
    rows = _write(
        tmp_path,
        {
            "__init__.py": "",
            "ops/__init__.py": "",
            "ops/launch.py": "import triton\n",
            "ops/norm/__init__.py": "",
            "ops/norm/api.py": "from flash_attn.ops.norm.triton.kernels import norm_fwd\n",
            "ops/norm/triton/__init__.py": "",
            "ops/norm/triton/kernels.py": (
                "import os\nimport numpy\nimport triton\n"
                "from flash_attn.ops.launch import launch\nfrom flash_attn.ops.norm import api\n"
            ),
            "ops/rope/__init__.py": "",
            "ops/rope/api.py": "from flash_attn.ops.norm.triton import kernels\n",
        },
    )
    problems = upward_imports(rows)
    assert [p.split(":")[:2] for p in problems] == [
        ["flash_attn.ops.norm.triton.kernels", "2 imports numpy"],
        ["flash_attn.ops.norm.triton.kernels", "5 imports flash_attn.ops.norm.api"],
        ["flash_attn.ops.rope.api", "1 imports flash_attn.ops.norm.triton.kernels"],
    ], problems


def test_a_listed_deferred_import_may_reach_up(tmp_path):
    source = "def __getattr__(name):\n    from flash_attn.modules import losses\n"
    rows = _write(
        tmp_path,
        {
            "__init__.py": "",
            "modules/__init__.py": "",
            "modules/losses.py": "from flash_attn.ops.cross_entropy import cross_entropy_loss\n",
            "ops/__init__.py": "",
            "ops/cross_entropy/__init__.py": source,
            "ops/linear_cross_entropy/__init__.py": source.replace("losses", "norm"),
            "modules/norm.py": "",
        },
    )
    assert upward_imports(rows) == [
        "flash_attn.ops.linear_cross_entropy:2 imports flash_attn.modules.norm: layer 4 -> 2 "
        "(upward)"
    ]
    assert package_cycles(rows) == []  # deferred: not part of the import-time graph
