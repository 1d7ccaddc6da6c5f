"""The shipped provisioner: the static executable `build-provisioner` makes, built once per test session.

Guest-side claims are tested with this file, not with `python -m`: it is what
runs on the preload VM (its loaders unpack it under $TMPDIR, change the
environment and delete the unpacked copy when it exits).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

from cos_customizer.provisioner_build import build


@functools.cache
def shipped_provisioner() -> Path:
    """The static provisioner for the current sources (from the user's build cache when it is there)."""
    directory = Path(tempfile.mkdtemp(prefix="cos-customizer-shipped."))
    atexit.register(shutil.rmtree, directory, True)
    output = directory / "provisioner"
    build(output, dict(os.environ))
    return output
