"""The cloud-config the preload VM boots with (metadata `user-data`).

It installs a unit that, on the serial port the workflow watches, mounts the
CIDATA disk and runs the provisioner (`run` on the first boot, `resume`
after), reboots when it exits 3, reports `BuildFailed:` and powers off after
a grace period on failure, and on success reports `BuildSucceeded:`, waits
for the workflow's `DaisyEnd` metadata key (so the serial log is captured),
then powers off.
"""

from __future__ import annotations

from cos_customizer.provisioner.vmsetup import REBOOT_MARKER

PROVISIONER = "/mnt/disks/cidata/provisioner"  # built for the source's architecture, so this VM's (`disks`)
CONFIG = "/mnt/disks/cidata/config.json"
# Where the provisioner's loaders (staticx, PyInstaller) unpack themselves: a tmpfs of its own, because
# COS mounts /tmp noexec and an unpacked program there cannot start.
LOADER_TMPDIR = "/mnt/disks/cos-customizer-tmp"

LOADER_SETUP = f"""mkdir -p {LOADER_TMPDIR}
if ! grep -qs " {LOADER_TMPDIR} " /proc/mounts; then
  mount -t tmpfs -o mode=0700,exec tmpfs {LOADER_TMPDIR}
fi
export TMPDIR={LOADER_TMPDIR}
"""

SCRIPT = f"""set -o errexit -o pipefail -o nounset
say() {{ echo "BuildStatus: $*"; }}
provision() {{
  local status=0
  rm -f {REBOOT_MARKER}
  "{PROVISIONER}" "$@" || status=$?
  if [ "$status" = 3 ] && [ ! -e {REBOOT_MARKER} ]; then
    status=loader  # exit 3 without the provisioner's reboot request: it never reached its main
  fi
  case "$status" in
    0)
      echo "BuildSucceeded: the image is provisioned; waiting for DaisyEnd, then powering off"
      "{PROVISIONER}" wait-metadata DaisyEnd --timeout=300 || true
      umount /mnt/disks/cidata || true
      umount /mnt/disks/scratch 2>/dev/null || true
      poweroff
      ;;
    3)
      say "rebooting to continue"
      sleep 10
      reboot
      ;;
    loader)
      echo "BuildFailed: the provisioner could not start (its loader exited 3; TMPDIR=${{TMPDIR:-unset}})"
      sleep 300 || true
      poweroff
      ;;
    *)
      echo "BuildFailed: the provisioner exited with status $status"
      sleep 300 || true
      poweroff
      ;;
  esac
  while true; do sleep 1; done
}}
if [ -e /dev/disk/by-label/SCRATCH ]; then
  mkdir -p /mnt/disks/scratch
  resize2fs -f /dev/disk/by-label/SCRATCH 2>&1 | sed "s/^/BuildStatus: /" || true
  mount /dev/disk/by-label/SCRATCH /mnt/disks/scratch
  mkdir -p /mnt/disks/scratch/gpu
fi
mkdir -p /mnt/disks/cidata
mount /dev/disk/by-label/CIDATA /mnt/disks/cidata
{LOADER_SETUP}if [ -e /var/lib/.cos-customizer/state.json ]; then
  provision resume
else
  provision run --config={CONFIG}
fi
"""


# What the provisioner's unit wants and starts after (the original's src/data/startup.yaml).
UNIT_AFTER = "network-online.target gcr-online.target docker.service"


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" if line else "\n" for line in text.splitlines())


def cloud_config() -> str:
    unit = (
        "[Unit]\nDescription=cos-customizer: provision this image\n"
        # As the original's unit: on COS, gcr-online.target is what lets a script pull from gcr.io right away.
        f"Wants={UNIT_AFTER}\nAfter={UNIT_AFTER}\n\n"
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nUser=root\nExecStart=/bin/bash /tmp/cos-customizer.sh\n"
        "StandardOutput=tty\nStandardError=tty\nTTYPath=%I\n"
    )
    return (
        "#cloud-config\n"
        "# cos-customizer: runs the provisioner from the CIDATA disk; its output goes to serial port 3.\n"
        "write_files:\n"
        "- path: /tmp/cos-customizer.sh\n  permissions: 0644\n  content: |\n"
        + _indent(SCRIPT, 4)
        + "- path: /etc/systemd/system/cos-customizer@.service\n  permissions: 0644\n  content: |\n"
        + _indent(unit, 4)
        + "runcmd:\n- systemctl daemon-reload\n"
        + '- |\n  if [ "$(uname -m)" = aarch64 ]; then tty=-dev-ttyAMA2; else tty=-dev-ttyS2; fi\n'
        + '  systemctl --no-block start "cos-customizer@${tty}.service"\n'
    )
