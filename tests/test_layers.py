"""Imports inside stepflow only point down the layers of DESIGN.md."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stepflow"

# Lower number = lower layer. A module may import only from its layer or below.
LAYERS = {
    "stepflow.errors": 0,
    "stepflow._json": 1,
    "stepflow.models": 1,
    "stepflow.store": 2,
    "stepflow.registry": 3,
    "stepflow.retry": 3,
    "stepflow.dag": 3,
    "stepflow.engine": 4,
    "stepflow.durable": 5,
    "stepflow.worker": 6,
    "stepflow.admin": 7,
    "stepflow.demo": 8,
    "stepflow.cli": 8,
    "stepflow": 9,
}


def _layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_imports_point_down_the_layers() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "stepflow":
                targets = [f"stepflow.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("stepflow") and _layer(target) > _layer(module):
                    violations.append(f"{module} imports {target}")
    assert violations == []


def test_no_pickle_or_stdlib_json_in_the_package() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {"pickle", "json", "marshal", "shelve"} & set(names), path
