"""What the provisioner prepares on the VM around the steps, as the original does.

- Before the steps: a tmpfs on `/root` (COS's `/root` is on the read-only
  root, so `$HOME` would not be writable) and `docker-credential-gcr
  configure-docker` with the image's own helper, so scripts can pull from
  gcr.io / Artifact Registry with the VM's service account.
- Before a shutdown-time relocation: journald stopped with `Restart=no`
  (it keeps files open on STATE, which must be unmounted), and the
  handler copied to `/tmp`, remounted exec: the program that is running now
  is a loader's temporary extraction that vanishes when it exits.
- The reboot request: a marker file beside the exit status 3, so the
  startup script can tell a request from a loader that failed before `main`.
Standard library only.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from cos_customizer.provisioner.environment import child_env, own_executable
from cos_customizer.provisioner.target import Target
from cos_customizer.runner import run

Say = Callable[[str], None]

HANDLER = "/tmp/cos-customizer-provisioner"
# Written just before the provisioner exits 3 to ask for a reboot; /run is a tmpfs, so a reboot clears it.
REBOOT_MARKER = "/run/cos-customizer-reboot"
CREDENTIAL_HELPER = "docker-credential-gcr"
JOURNALD_OVERRIDE = "/etc/systemd/system/systemd-journald.service.d/override.conf"
# The units the original stops so that nothing writes to STATE while it is unmounted at shutdown.
JOURNALD_UNITS = (
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-journald-audit.socket",
    "syslog.socket",
    "systemd-journald.service",
)


def prepare(target: Target, say: Say) -> None:
    """The environment the steps run in: a writable `$HOME`, docker credentials for Google registries."""
    target.mount_tmpfs("/root")
    helper = find_program(target, CREDENTIAL_HELPER)
    if helper is None:
        say(f"{CREDENTIAL_HELPER} is not on this image: docker gets no Google registry credentials")
        return
    say(f"Configuring docker with {helper}")
    argv = [helper if target.chroot else str(target.path(helper)), "configure-docker"]
    command, cwd = target.command("/", argv)
    env = child_env({"HOME": "/root"})
    run(command, cwd=Path(cwd) if cwd else None, env=env, on_line=say)


def find_program(target: Target, name: str) -> str | None:
    """`name` on the target's PATH, as a path of the target."""
    for directory in child_env().get("PATH", "/usr/bin:/bin").split(":"):
        candidate = f"{directory.rstrip('/')}/{name}"
        if directory.startswith("/") and os.access(target.path(candidate), os.X_OK):
            return candidate
    return None


def stop_journald(target: Target, say: Say) -> None:
    """Stop journald for good (no restart on its sockets' activity), as the original does before shutdown."""
    override = target.path(JOURNALD_OVERRIDE)
    override.parent.mkdir(parents=True, exist_ok=True)
    override.write_text("[Service]\nRestart=no\n")
    target.systemctl_run("daemon-reload")
    for unit in JOURNALD_UNITS:
        target.systemctl_run("stop", unit)
    say("Stopped journald so that STATE can be unmounted at shutdown")


def install_handler(target: Target) -> list[str]:
    """The command line that runs this program at shutdown, from a copy in an exec `/tmp`."""
    if not getattr(sys, "frozen", False):  # running from source (development): the interpreter stays
        return [sys.executable, "-m", "cos_customizer.provisioner"]
    target.remount_exec("/tmp")
    copy = target.path(HANDLER)
    partial = copy.with_name(copy.name + ".partial")
    shutil.copyfile(own_executable(), partial)
    partial.chmod(0o755)
    partial.replace(copy)
    return [HANDLER]


def request_reboot(target: Target) -> None:
    marker = target.path(REBOOT_MARKER)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("the provisioner asks for a reboot, then `resume`\n")
