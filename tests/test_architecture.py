"""The layout's rules, checked on the source: one dependency direction, and no print() below the CLI."""

from __future__ import annotations

import ast

import pytest

from .conftest import ROOT

# Lowest first: a module may import its own layer and the ones before it, never a later one.
LAYERS = ["core", "images", "models", "features", "heads", "deploy", "tuning", "reporting", "app", "cli"]
MODULES = sorted((ROOT / "pipeline").rglob("*.py"))


def _layer(path) -> str | None:
    parts = path.relative_to(ROOT / "pipeline").parts
    return parts[0] if len(parts) > 1 else None  # pipeline/__init__.py stands above every layer


def _imported_layers(tree: ast.AST) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(tree):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in LAYERS:
                found.add((parts[1], node.lineno))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers_only(path):
    layer = _layer(path)
    if layer is None:
        return
    assert layer in LAYERS, f"{path} is outside the known layers"
    upward = [f"line {line}: pipeline.{target}" for target, line in _imported_layers(ast.parse(path.read_text()))
              if LAYERS.index(target) > LAYERS.index(layer)]
    assert not upward, f"{path.relative_to(ROOT)} ({layer}) imports a higher layer: {', '.join(upward)}"


@pytest.mark.parametrize("path", [p for p in MODULES if _layer(p) != "cli"], ids=lambda p: str(p.relative_to(ROOT)))
def test_library_code_never_prints(path):
    calls = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not calls, f"{path.relative_to(ROOT)} calls print() on lines {calls}: log, or report through a callback"
