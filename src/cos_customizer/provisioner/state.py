"""The provisioner's persistent state: `/var/lib/.cos-customizer/state.json` on STATE.

It holds the config, the index of the next step, and what the boot-disk
sequence has done. Every change is written atomically before the next
action, so a reboot at any point resumes where the work stopped.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cos_customizer.errors import CustomizerError
from cos_customizer.provisioner.config import ProvisionerConfig

STATE_FILE = "state.json"


@dataclasses.dataclass
class State:
    directory: Path
    config: ProvisionerConfig
    current_step: int = 0
    disk_resize_done: bool = False
    # The layout the shutdown handler was asked to produce (partition -> [first, last]) and the
    # file-system sizes to grow to afterwards; None until a relocation is scheduled.
    layout: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.directory / STATE_FILE

    def save(self) -> None:
        data = {
            "Config": self.config.to_json(),
            "CurrentStep": self.current_step,
            "DiskResizeComplete": self.disk_resize_done,
            "Layout": self.layout,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.directory)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def create(cls, directory: Path, config: ProvisionerConfig) -> State:
        if (directory / STATE_FILE).exists():
            raise CustomizerError(
                f"{directory / STATE_FILE} exists: a provisioning run already started here; use `resume`"
            )
        state = cls(directory, config)
        state.save()
        return state

    @classmethod
    def load(cls, directory: Path) -> State:
        path = directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CustomizerError(f"{path} does not exist: nothing to resume; start with `run --config=FILE`") from None
        except json.JSONDecodeError as err:
            raise CustomizerError(f"{path} is corrupted ({err.msg} at line {err.lineno})") from err
        return cls(
            directory,
            ProvisionerConfig.from_json(data["Config"], str(path)),
            int(data.get("CurrentStep", 0)),
            bool(data.get("DiskResizeComplete", False)),
            data.get("Layout"),
        )
