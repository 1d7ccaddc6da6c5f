"""The environment child processes get: the one the VM gave the provisioner, nothing of the loader's.

The shipped provisioner is a PyInstaller one-file program wrapped by
staticx. Both loaders change the environment before `main` runs: PyInstaller
points `LD_LIBRARY_PATH` at its extraction directory (keeping the caller's
value in `LD_LIBRARY_PATH_ORIG`) and adds `_PYI_*`/`_MEI*` variables; staticx
adds `STATICX_*`. A user script, `setup_gpu.sh` or an installer run with that
environment would load the bundled Debian libraries instead of the image's.
Standard library only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# Variables PyInstaller's bootloader sets, each with the caller's value saved under NAME_ORIG.
_RESTORED = ("LD_LIBRARY_PATH",)
_LOADER_PREFIXES = ("_PYI_", "_MEI", "STATICX_", "PYINSTALLER_")


def child_env(
    extra: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
    frozen: bool | None = None,
) -> dict[str, str]:
    """The environment for a child process: `base` (default: ours) without the loaders' traces, plus `extra`."""
    source = dict(os.environ if base is None else base)
    if frozen is None:
        frozen = bool(getattr(sys, "frozen", False))
    env = {key: value for key, value in source.items() if not key.startswith(_LOADER_PREFIXES)}
    for name in _RESTORED:
        original = env.pop(f"{name}_ORIG", None)
        if frozen or original is not None:
            env.pop(name, None)
        if original is not None:
            env[name] = original
    env.update(extra or {})
    return env


def own_executable() -> str:
    """The file this program was started from (not the loader's temporary copy)."""
    return os.environ.get("STATICX_PROG_PATH") or sys.executable
