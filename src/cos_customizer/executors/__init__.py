"""Where finish-image-build does its work, and what each executor can do.

The build's source decides the executor: `-image-file` means `local`
(offline, on an image file), a Compute Engine image means `gce` (Daisy).
"""

from __future__ import annotations

import enum
import re

from cos_customizer.config import SourceImage
from cos_customizer.errors import ValidationError
from cos_customizer.provisioner.config import ProvisionerConfig, StepType

# The provisioner's last serial line when a step of its config failed (provisioner.agent: `finish`, `execute`):
# `BuildFailed: step N (TYPE): reason`, N the step's 0-based index in the config.
FAILED_STEP_LINE = re.compile(r"BuildFailed: step (\d{1,6}) \((\w+)\): ")

# The command-line step that adds each provisioner step.
STEP_COMMANDS = {
    StepType.RUN_SCRIPT: "run-script",
    StepType.INSTALL_GPU: "install-gpu",
    StepType.DISABLE_AUTO_UPDATE: "disable-auto-update",
    StepType.SEAL_OEM: "seal-oem",
    StepType.INSTALL_PACKAGES: "anthos-installer-install",
}


class Executor(enum.StrEnum):
    LOCAL = "local"
    GCE = "gce"
    QEMU = "qemu"  # a local source, built by the GCE workflow and provisioner in a QEMU VM (a rehearsal)


SUPPORTED_STEPS = {
    Executor.LOCAL: frozenset({StepType.RUN_SCRIPT, StepType.DISABLE_AUTO_UPDATE, StepType.SEAL_OEM}),
    Executor.GCE: frozenset(StepType),
    Executor.QEMU: frozenset({StepType.RUN_SCRIPT, StepType.DISABLE_AUTO_UPDATE, StepType.SEAL_OEM}),
}

WHY_NOT = {
    Executor.LOCAL: {
        StepType.INSTALL_GPU: "it runs the COS GPU installer container, which needs Docker and a GPU on a "
        "running COS VM",
        StepType.INSTALL_PACKAGES: "the Anthos installer needs a running COS VM",
    },
    Executor.QEMU: {
        StepType.INSTALL_GPU: "the QEMU VM has no GPU",
        StepType.INSTALL_PACKAGES: "the Anthos installer downloads its packages from the internet, which a "
        "rehearsal does not reach",
    },
}


def executor_for(source: SourceImage) -> Executor:
    return Executor.LOCAL if source.is_local else Executor.GCE


def check_supported(executor: Executor, config: ProvisionerConfig) -> None:
    """Refuse, before anything is touched, a step that `executor` cannot run."""
    for index, step in enumerate(config.steps):
        if step.type in SUPPORTED_STEPS[executor]:
            continue
        raise ValidationError(
            f"step {index + 1} ({STEP_COMMANDS[step.type]}) cannot run on the {executor.value} executor: "
            f"{WHY_NOT.get(executor, {}).get(step.type, 'not supported')}; use the gce executor "
            "(start-image-build with -image-project and -image-name, -image-family or -image-milestone)"
        )


def failed_step(text: str, config: ProvisionerConfig) -> int | None:
    """The index of the step of `config` that the provisioner's `BuildFailed:` line in `text` names, if it names one
    (a failure outside the steps, or a line that does not match the config, names none)."""
    match = FAILED_STEP_LINE.search(text)
    if match is None:
        return None
    index = int(match.group(1))
    if index < len(config.steps) and config.steps[index].type.value == match.group(2):
        return index
    return None
