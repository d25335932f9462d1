"""Imports run one way: a package of src/vlmkit imports only from its own layer or those below.

Every import counts, those inside functions too (a lazy import is still a dependency).
The layers are written in the README's Layout section; change both together.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmkit"

# Lowest first. "vlmkit" is the package root (__init__.py): the public facade, on top.
LAYERS = [
    ("config", "presets", "losses", "runtime"),   # base: typed configs, named presets, losses, devices/logging
    ("models",),                                  # modules only
    ("data", "viz"),                              # data and pictures (drawing only)
    ("checkpoint", "convert"),                    # storage: our format and the others
    ("training", "inference"),                    # work: learning, and generating
    ("evaluation",),                              # measurement (and the hooks that attach it to training)
    ("demo", "serving", "cli", "__main__", "vlmkit"),   # applications (`__main__`: `python -m vlmkit`)
]
# Packages of one layer do not import each other, except these (importer, imported).
SAME_LAYER = {("presets", "config"), ("convert", "checkpoint"), ("training", "inference"), ("cli", "demo"),
              ("cli", "serving"), ("__main__", "cli")}

LAYER_OF = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def _package(module: str) -> str:
    """vlmkit.data.sources.shapes -> data; vlmkit.checkpoint -> checkpoint; vlmkit -> vlmkit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    parts = ("vlmkit",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(module: str, is_package: bool, text: str) -> list[tuple[int, str]]:
    """(line, imported vlmkit module) for every import in `module`'s source, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(text, module)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from vlmkit import data` names a package, `from vlmkit import load` a name of the root.
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                exists = (SRC.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or \
                    (SRC.parent / sub.replace(".", "/")).is_dir()
                found.append((node.lineno, sub if exists else target))
    return [(line, name) for line, name in found if name == "vlmkit" or name.startswith("vlmkit.")]


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert packages | {"vlmkit"} == set(LAYER_OF), "put new packages in LAYERS (and in the README's Layout)"


def test_imports_run_one_way():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        importer = _package(_module_name(path))
        for line, target in _imports(_module_name(path), path.name == "__init__.py", path.read_text()):
            imported = _package(target)
            if imported == importer:
                continue
            if LAYER_OF[imported] > LAYER_OF[importer] or (
                    LAYER_OF[imported] == LAYER_OF[importer] and (importer, imported) not in SAME_LAYER):
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: {importer} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


@pytest.mark.parametrize("source, expected", [
    ("from vlmkit.evaluation import grounding", "vlmkit.evaluation.grounding"),
    ("from ..evaluation.vqa import vqa_accuracy", "vlmkit.evaluation.vqa"),
    ("from . import boxes", "vlmkit.data.boxes"),
    ("def f():\n    import vlmkit.training.trainer", "vlmkit.training.trainer"),
    ("from vlmkit import load", "vlmkit"),
])
def test_the_checker_sees_every_kind_of_import(source, expected):
    """Absolute, relative, lazy and root imports must all be found, or the contract proves nothing."""
    assert [name for _, name in _imports("vlmkit.data.probe", False, source)] == [expected]
