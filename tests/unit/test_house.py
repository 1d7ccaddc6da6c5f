"""The house rules, read from the sources: a wing of `executors/` never imports another wing, the shared root
imports no wing, no private name crosses a module, and every module says on its first line what it is for."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import cos_customizer

PACKAGE = Path(cos_customizer.__file__).parent
EXECUTORS = PACKAGE / "executors"
WINGS = ("local", "gce", "qemu")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(path: Path) -> Iterator[tuple[int, str]]:
    """Every module `path` imports (for `from X import Y`, X.Y when that is a module, else X), with its line."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield node.lineno, full if full in MODULES else node.module


def _wing_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["cos_customizer", "executors"] and len(parts) > 2 and parts[2] in WINGS:
        return parts[2]
    return None


def test_the_wings_and_the_root_are_where_the_rules_say() -> None:
    assert sorted(p.name for p in EXECUTORS.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(WINGS)


@pytest.mark.parametrize("wing", [*WINGS, None])
def test_a_wing_imports_no_other_wing_and_the_root_imports_none(wing: str | None) -> None:
    here = sorted(EXECUTORS.glob("*.py")) if wing is None else sorted((EXECUTORS / wing).rglob("*.py"))
    crossings = [
        f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        for path in here
        for line, module in _imported(path)
        if _wing_of(module) not in (None, wing)
    ]
    assert crossings == []


def test_nothing_but_the_entry_point_imports_the_command_line() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        for name, path in MODULES.items()
        if not name.startswith("cos_customizer.cli") and name != "cos_customizer.__main__"
        for line, module in _imported(path)
        if module.startswith("cos_customizer.cli")
    ]
    assert found == []


def _private_uses(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text())
    modules: dict[str, str] = {}  # local name -> module of this package
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cos_customizer"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"{path.relative_to(PACKAGE)}:{node.lineno} imports {full}"
                if full in MODULES:
                    modules[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield f"{path.relative_to(PACKAGE)}:{node.lineno} uses {modules[node.value.id]}.{node.attr}"


def test_no_private_name_is_used_outside_its_module() -> None:
    assert [use for path in MODULES.values() for use in _private_uses(path)] == []


def test_every_module_says_what_it_is_for() -> None:
    undocumented = [
        str(path.relative_to(PACKAGE))
        for path in MODULES.values()
        if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    ]
    assert undocumented == []
