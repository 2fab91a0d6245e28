"""The import rules of docs/architecture.md: tuner <- data <- distill, eval; distill and eval meet only in the CLI."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import caprese_peft

PACKAGE = Path(caprese_peft.__file__).parent
ABOVE_THE_TUNER = ("data", "distill", "eval", "cli", "lm_eval")
# the public API (caprese_peft/__init__.py) names distillation exports lazily; the command line may import anything
NOT_A_PART = ("__init__.py", "cli.py", "lm_eval.py")


def imported_modules(path: Path, package: str) -> list[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against ``package``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.append(importlib.util.resolve_name("." * node.level + (node.module or ""), package))
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def modules_of(part: str) -> list[tuple[Path, str]]:
    """``(path, package)`` of every module of ``part``; ``"tuner"`` is everything below the other parts."""
    if part != "tuner":
        return [(path, f"caprese_peft.{part}") for path in sorted((PACKAGE / part).glob("*.py"))]
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ABOVE_THE_TUNER or relative.name in NOT_A_PART and len(relative.parts) == 1:
            continue
        found.append((path, ".".join(("caprese_peft", *relative.parts[:-1]))))
    return found


@pytest.mark.parametrize(
    ("part", "forbidden"),
    [
        ("tuner", ABOVE_THE_TUNER),
        ("data", ("distill", "eval", "cli")),
        ("distill", ("eval", "cli")),
        ("eval", ("distill", "cli")),
    ],
)
def test_parts_import_one_way(part, forbidden):
    modules = modules_of(part)
    assert modules, part
    for path, package in modules:
        for name in imported_modules(path, package):
            bad = [f for f in forbidden if name == f"caprese_peft.{f}" or name.startswith(f"caprese_peft.{f}.")]
            assert not bad, f"{path.relative_to(PACKAGE)} imports {name}: the {part} part may not import {bad}"


def test_the_rules_see_a_violation(tmp_path):
    """The walk resolves relative imports, so ``from ..distill import x`` inside eval is caught."""
    module = tmp_path / "bad.py"
    module.write_text("from ..distill.losses import layer_mse\nimport caprese_peft.eval.metrics\n")
    assert imported_modules(module, "caprese_peft.eval") == [
        "caprese_peft.distill.losses",
        "caprese_peft.eval.metrics",
    ]
