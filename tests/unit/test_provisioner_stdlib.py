"""The provisioner ships in a small static executable: standard library only, all the way down."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cos_customizer

PACKAGE = Path(cos_customizer.__file__).parent


def module_file(name: str) -> Path:
    parts = name.split(".")[1:]
    path = PACKAGE.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "cos_customizer" or node.module.startswith("cos_customizer."):
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def closure() -> dict[str, set[str]]:
    """Every module the provisioner imports, with what each imports."""
    start = [
        f"cos_customizer.provisioner.{p.stem}" for p in (PACKAGE / "provisioner").glob("*.py") if p.stem != "__init__"
    ]
    seen: dict[str, set[str]] = {}
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen or not module_file(name).exists():
            continue
        seen[name] = imports_of(module_file(name))
        todo.extend(i for i in seen[name] if i.startswith("cos_customizer"))
    return seen


def test_provisioner_imports_only_the_standard_library() -> None:
    modules = closure()
    assert "cos_customizer.provisioner.agent" in modules and "cos_customizer.disk.planner" in modules
    for module, imported in modules.items():
        for name in imported:
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top in ("__future__", "cos_customizer"), f"{module} imports {name}"


def test_loading_the_provisioner_pulls_in_no_third_party_module() -> None:
    code = (
        "import sys, cos_customizer.provisioner.main\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'pydantic', 'rich', 'google'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
