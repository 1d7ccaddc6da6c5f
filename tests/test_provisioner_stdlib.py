"""The provisioner ships in a small static executable: standard library only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cos_customizer

PACKAGE = Path(cos_customizer.__file__).parent
# Modules outside the provisioner package that it may use: stdlib-only themselves.
ALLOWED = {"cos_customizer", "cos_customizer.errors", "cos_customizer.units"}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_provisioner_imports_only_the_standard_library() -> None:
    files = [*sorted((PACKAGE / "provisioner").rglob("*.py")), PACKAGE / "errors.py", PACKAGE / "units.py"]
    assert len(files) >= 4
    for path in files:
        for name in imports_of(path):
            top = name.split(".")[0]
            ok = (
                top in sys.stdlib_module_names
                or top == "__future__"
                or name in ALLOWED
                or name.startswith("cos_customizer.provisioner")
            )
            assert ok, f"{path.relative_to(PACKAGE)} imports {name}"


def test_loading_the_provisioner_config_pulls_in_no_third_party_module() -> None:
    code = (
        "import sys, cos_customizer.provisioner.config\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'pydantic', 'rich', 'google'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
