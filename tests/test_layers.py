"""Imports go one way: base (errors, registry, cache, losses) < text < models < data < eval < train < apps.

Every ``import`` in the package is read with ``ast`` (function-level imports included), so a
lazy import cannot hide a cycle. ``eval`` and ``train`` never meet through ``data``/``models``:
the built-in benchmark, chat backends, batching and text heuristics live below both. ``train`` may
use evaluation's generator and cache (make-responses, the teacher probe); ``eval`` never uses ``train``.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "polyalign"

# Lower number = lower layer; a module may import its own layer or any lower one.
LAYERS = {
    "polyalign.errors": 0, "polyalign.registry": 0, "polyalign.cache": 0, "polyalign.losses": 0,
    "polyalign.text": 1,
    "polyalign.models": 2,
    "polyalign.data": 3,
    "polyalign.eval": 4,
    "polyalign.train": 5,
    "polyalign.cli": 6, "polyalign.demo": 6, "polyalign.export": 6, "polyalign.sweep": 6,
    "polyalign": 0,  # the root package holds only __version__ and PolyalignError
}
# Pairs that must never import each other, whatever the numbers say.
FORBIDDEN = [("polyalign.data", "polyalign.eval"), ("polyalign.data", "polyalign.train"),
             ("polyalign.eval", "polyalign.train"), ("polyalign.models", "polyalign.eval"),
             ("polyalign.models", "polyalign.train"), ("polyalign.models", "polyalign.data"),
             ("polyalign.text", "polyalign.data")]


def layer_of(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def polyalign_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("polyalign")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("polyalign") and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = layer_of(module_name(path))
        for line, target in polyalign_imports(path):
            them = layer_of(target)
            if LAYERS[them] > LAYERS[me] or (me, them) in FORBIDDEN:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {me} imports {target}")
    return bad


def test_imports_go_one_way():
    assert violations() == []


def test_the_checker_sees_lazy_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from polyalign.train.recipes import load_recipe\n    import polyalign.eval.runner\n")
    assert polyalign_imports(f) == [(2, "polyalign.train.recipes"), (3, "polyalign.eval.runner")]


@pytest.mark.parametrize("module", ["polyalign.data.builtin", "polyalign.models.backends", "polyalign.models.batching",
                                    "polyalign.text.langid", "polyalign.text.refusal", "polyalign.cache"])
def test_every_package_module_has_a_layer(module):
    assert layer_of(module) in LAYERS
