"""The stock SPDX validator (`pyspdxtools` of spdx-tools, a dev dependency) as a test oracle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def validator() -> str:
    """pyspdxtools beside this Python (the venv's), else on PATH."""
    found = Path(sys.executable).with_name("pyspdxtools")
    return str(found) if found.exists() else shutil.which("pyspdxtools") or "pyspdxtools"


def check_valid(document: dict[str, Any]) -> None:
    """Fail the test unless `pyspdxtools -i FILE --version SPDX-2.2` calls the document valid."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "document.spdx.json"
        path.write_text(json.dumps(document))
        result = subprocess.run([validator(), "-i", str(path), "--version", "SPDX-2.2"], capture_output=True,
                                text=True, check=False)  # fmt: skip
    assert result.returncode == 0, f"pyspdxtools refused the SBOM:\n{result.stdout}{result.stderr}"
