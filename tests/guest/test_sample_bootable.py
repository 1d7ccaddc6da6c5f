"""`sample-image -bootable`: the image boots for real under QEMU (TCG) into systemd and runs cloud-init.

Each test boots the image with the local Daisy runner and the qemu executor, as a GCE build would:
CreateDisks from the image, CreateInstances with a `user-data` cloud-config (served by the
instance's metadata server at 169.254.169.254), WaitForInstancesSignal on serial port 3.

The cloud-config's script prints what the guest sees to /dev/ttyS2 (`BuildStatus:` lines): PID 1,
/proc/self/mountinfo, `rootdev -s`, whether / and /etc are writable and /tmp executable, the metadata
server's token. On boot 1 it leaves a marker in /var/lib (on STATE) and reboots; boot 2 must run the
user-data again (cloud-init runs it on every boot, as on COS), find the marker, say `BuildSucceeded`
and power off. A ROOT-A with one byte changed must not boot: the initramfs stops at the dm-verity
check and says so on the console.

Expectations under TCG on this machine (2 cores, nothing else running): the first guest build
~1.5 min (debootstrap; plus the kernel's download once), later image builds ~1.5 s; a boot to the
end of cloud-init's runcmd ~25 s (kernel 2.5 s, initramfs 2.5 s, systemd to STATE mounted ~13 s,
cloud-init's Python start ~6 s), a reboot cycle ~27 s; the two-boot test ~60-70 s (about twice that
while another QEMU shares the two cores).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cos_customizer.disk import gpt, grub
from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.executors.qemu import daisy as daisy_local
from cos_customizer.executors.qemu.instances import QemuInstances
from cos_customizer.executors.qemu.resources import Resources
from cos_customizer.images import ImageFormat
from cos_customizer.sample import image as sample_image
from cos_customizer.sample import initramfs as sample_initramfs
from tests.conftest import CLI

PROBE = r"""#!/bin/bash
exec >/dev/ttyS2 2>&1
say() { echo "BuildStatus: $*"; }
if [ -e /var/lib/sample-marker ]; then boot=2; else boot=1; fi
say "boot $boot"
say "pid1 $(cat /proc/1/comm) $(readlink /proc/1/exe)"
awk '{ for (i = 7; $i != "-"; i++); print "BuildStatus: mount", $5, $(i + 2), $(i + 1), $6 }' /proc/self/mountinfo
say "rootdev-s $(rootdev -s)"
if touch /sample-probe 2>/dev/null; then say "root writable"; else say "root read-only"; fi
if touch /etc/sample-probe; then say "etc writable"; fi
cp /bin/true /tmp/sample-true
if /tmp/sample-true 2>/dev/null; then say "tmp exec"; else say "tmp noexec"; fi
token=$(python3 -c 'import urllib.request as u; print(u.urlopen(u.Request("http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token", headers={"Metadata-Flavor": "Google"}), timeout=10).read().decode())')
case "$token" in *access_token*) say "token ok" ;; *) say "token bad: $token" ;; esac
if [ "$boot" = 1 ] && [ "$BOOTS" = 2 ]; then
  echo marker > /var/lib/sample-marker
  sync
  say "rebooting"
  systemctl --no-block reboot
else
  [ "$boot" = 1 ] || echo "BuildSucceeded: boot 2 ran the user-data again and found boot 1's marker"
  [ "$boot" = 2 ] || echo "BuildSucceeded: the one boot asked for"
  systemctl --no-block poweroff
fi
"""


def _user_data(boots: int) -> str:
    """The cloud-config: write the probe to /tmp, run it (it reboots once when `boots` is 2)."""
    script = "".join(f"      {line}\n" if line else "\n" for line in PROBE.splitlines())
    return (
        "#cloud-config\nwrite_files:\n- path: /tmp/sample-probe.sh\n  permissions: '0644'\n  content: |\n"
        f"{script}runcmd:\n- [env, BOOTS={boots}, bash, /tmp/sample-probe.sh]\n"
    )


def _build(path: Path, grub_format: str) -> Path:
    for tool in (qemu_boot.QEMU, "socat", "mcopy", "debootstrap"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    if os.geteuid() != 0:
        pytest.skip("the bootable sample is built as root (debootstrap, chroot)")
    return sample_image.build(path, grub_format=grub_format, bootable=True).path


@pytest.fixture(scope="module")
def bootable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("bootable") / "cos.raw", "dm")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sb.") as path:
        yield Path(path)


def _document(user_data: str, port: int, wait: dict[str, Any], timeout: str) -> dict[str, Any]:
    return {
        "Name": "bootable-sample",
        "Steps": {
            "disk": {"CreateDisks": [{"Name": "boot-disk", "SourceImage": "src"}]},
            "run": {
                "CreateInstances": [
                    {"Name": "vm", "Disks": [{"Source": "boot-disk"}], "Metadata": {"user-data": user_data}}
                ]
            },
            "wait": {
                "WaitForInstancesSignal": [{"Name": "vm", "SerialOutput": {"Port": port, **wait}}],
                "Timeout": timeout,
            },
            "off": {"WaitForInstancesSignal": [{"Name": "vm", "Stopped": True}], "Timeout": "120s"},
        },
        "Dependencies": {"run": ["disk"], "wait": ["run"], "off": ["wait"]},
    }


class Booted:
    """The outcome of one workflow run: events, the instance, and its serial logs (kept before cleanup)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.events: list[daisy_local.StepEvent] = []
        self.instances: QemuInstances | None = None

    @property
    def status(self) -> list[str]:
        return [e.detail.removeprefix("BuildStatus: ") for e in self.events if e.kind == "status"]

    @property
    def console(self) -> str:
        path = self.directory / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def mounts(self, boot: int) -> dict[str, tuple[str, str, str]]:
        """Mount point -> (source, type, options) as boot `boot` printed them."""
        lines = self.status
        start = lines.index(f"boot {boot}")
        found: dict[str, tuple[str, str, str]] = {}
        for line in lines[start + 1 :]:
            if line.startswith("boot "):
                break
            if line.startswith("mount "):
                _, point, source, fstype, options = line.split(" ", 4)
                found[point] = (source, fstype, options)
        return found


def _boot(
    short_dir: Path, image: Path, wait: dict[str, Any], *, boots: int = 2, port: int = 3, timeout: str = "400s"
) -> Booted:
    booted = Booted(short_dir / "kept")
    booted.directory.mkdir()
    (short_dir / "work").mkdir()
    (short_dir / "run").mkdir()
    with Resources(short_dir / "work", gcs_path="gs://bucket/dir", output_path=short_dir / "out.raw",
                   output_format=ImageFormat.RAW, source_images={"src": image}) as resources:  # fmt: skip
        instances = QemuInstances(resources, accel="tcg", rundir=short_dir / "run")
        booted.instances = instances
        handlers = {**resources.handlers(), **instances.handlers()}
        wait_handler = handlers["WaitForInstancesSignal"]

        def wait_and_keep(step: str, body: Any, context: daisy_local.StepContext) -> None:
            try:
                wait_handler(step, body, context)
            finally:  # the instance's directory goes with the cleanup: keep its serial logs
                machine = instances.machines.get("vm")
                if machine is not None:
                    for source, name in ((machine.console, "console.log"), (machine.port3, "port3.log")):
                        if source.exists():
                            shutil.copyfile(source, booted.directory / name)

        handlers["WaitForInstancesSignal"] = wait_and_keep
        wf = daisy_local.load(_document(_user_data(boots), port, wait, timeout), {}, autovars=resources.autovars())
        try:
            daisy_local.run(wf, handlers, default_timeout=60.0, deadline=None, on_event=booted.events.append)
        finally:
            machine = instances.machines.get("vm")
            for pid in machine.pids if machine else []:
                if Path(f"/proc/{pid}").exists():  # the runner must have stopped it
                    os.kill(pid, 9)
                    pytest.fail(f"QEMU {pid} was still running after the workflow")
    assert list((short_dir / "work").iterdir()) == []
    assert list((short_dir / "run").iterdir()) == []
    return booted


SIGNAL = {"SuccessMatch": "BuildSucceeded", "FailureMatch": ["BuildFailed"], "StatusMatch": "BuildStatus"}


def _explain(booted: Booted) -> str:
    return "\n".join(booted.status) + "\n--- console (tail) ---\n" + booted.console[-6000:]


def test_boots_into_systemd_with_cos_layout_and_runs_user_data_every_boot(short_dir: Path, bootable: Path) -> None:
    try:
        booted = _boot(short_dir, bootable, SIGNAL)
    except daisy_local.WorkflowStepFailed as err:
        kept = Booted(short_dir / "kept")
        pytest.fail(f"{err}\n{_explain(kept)}")
    status = booted.status
    assert booted.instances is not None
    machine = booted.instances.machines["vm"]
    assert machine.boots == 2, _explain(booted)
    assert machine.reasons == ["guest-reset", "guest-shutdown"]
    assert [s for s in status if s.startswith("boot ")] == ["boot 1", "boot 2"]
    assert "rebooting" in status
    assert status.count("pid1 systemd /usr/lib/systemd/systemd") == 2, _explain(booted)
    for boot in (1, 2):
        mounts = booted.mounts(boot)
        source, fstype, options = mounts["/"]
        assert source in ("/dev/mapper/vroot", "/dev/dm-0") and fstype == "ext2"
        assert options.split(",")[0] == "ro"
        assert mounts["/etc"][1] == "overlay" and mounts["/etc"][2].startswith("rw")
        source, fstype, options = mounts["/tmp"]
        assert fstype == "tmpfs" and {"rw", "nosuid", "nodev", "noexec"} <= set(options.split(","))
        for point in ("/mnt/stateful_partition", "/var", "/home"):
            source, fstype, options = mounts[point]
            assert (source, fstype) == ("/dev/sda1", "ext4"), (point, mounts[point])
            assert {"rw", "nosuid", "nodev", "noexec"} <= set(options.split(",")), (point, options)
        source, fstype, options = mounts["/usr/share/oem"]
        assert (source, fstype) == ("/dev/sda8", "ext4")
        assert {"rw", "nosuid", "nodev", "noexec"} <= set(options.split(","))
        assert "/root" not in mounts  # read-only, part of /
    for line in ("rootdev-s /dev/sda3", "root read-only", "etc writable", "tmp noexec", "token ok"):
        assert status.count(line) == 2, (line, _explain(booted))
    finished = [e.step for e in booted.events if e.kind == "finished"]
    assert finished == ["disk", "run", "wait", "off"]
    for pid in machine.pids:
        assert not Path(f"/proc/{pid}").exists()


def test_the_dm_mod_grub_format_boots(short_dir: Path, tmp_path: Path) -> None:
    image = _build(tmp_path / "cos.raw", "dm-mod")
    booted = _boot(short_dir, image, SIGNAL, boots=1)  # one boot is enough here
    assert booted.instances is not None and booted.instances.machines["vm"].boots == 1
    assert "rootdev-s /dev/sda3" in booted.status and "token ok" in booted.status
    assert booted.mounts(1)["/"][0] in ("/dev/mapper/vroot", "/dev/dm-0")
    assert "pid1 systemd /usr/lib/systemd/systemd" in booted.status
    assert "dm-mod.create" in booted.console


def test_a_changed_root_a_byte_stops_the_verified_boot(short_dir: Path, bootable: Path, tmp_path: Path) -> None:
    image = tmp_path / "corrupt.raw"
    subprocess.run(["cp", "--sparse=always", str(bootable), str(image)], check=True)
    root_a = gpt.read_table(image).partition(3)
    with open(image, "r+b") as disk:  # the first byte of ROOT-A's first block: ext2 never reads it, verity does
        disk.seek(root_a.first * gpt.SECTOR)
        byte = disk.read(1)
        disk.seek(root_a.first * gpt.SECTOR)
        disk.write(bytes([byte[0] ^ 0xFF]))
    # Waited for as a rehearsal waits (serial port 3): the guest powers off, and the error quotes the console.
    with pytest.raises(daisy_local.WorkflowStepFailed) as failed:
        _boot(short_dir, image, SIGNAL, boots=1, port=3, timeout="120s")
    message = str(failed.value)
    assert "stopped before its serial port 3 matched: the guest powered off after 1 boot(s)" in message
    assert re.search(r"the console's last lines: .*cos-initrd: FATAL: dm-verity: vroot", message), message
    kept = (short_dir / "kept" / "console.log").read_text(errors="replace")
    assert re.search(r"device-mapper: verity: \S+: data block 0 is corrupted", kept), kept[-4000:]
    assert "switching to" not in kept and "Welcome to" not in kept  # the initramfs never left for the root


def test_bootable_is_refused_without_root_in_one_line(
    cli: CLI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = cli("sample-image", "-bootable", str(tmp_path / "cos.raw"))
    assert result.code == 1
    assert result.err.strip().splitlines() == [
        "cos-customizer: error: -bootable builds a Debian root with debootstrap and chroot: run it as root"
    ]
    assert not (tmp_path / "cos.raw").exists()


@pytest.mark.parametrize("grub_format", sample_image.GRUB_FORMATS)
def test_the_initramfs_reads_each_verity_form_with_an_oem_device(grub_format: str) -> None:
    """The initramfs's awk programs (run by busybox awk, as in the guest) turn grub.cfg's verity argument,
    with seal-oem's `oemroot` added, into the same dmsetup tables for both forms and both quotings."""
    if not sample_initramfs.BUSYBOX.exists():
        pytest.skip("busybox-static is not installed")
    root_a = gpt.Partition(3, gpt.CHROMEOS_ROOT, uuid.UUID(int=3), 4509696, 8703999, 0, "ROOT-A")
    root_b = gpt.Partition(5, gpt.CHROMEOS_ROOT, uuid.UUID(int=5), 315392, 4509695, 0, "ROOT-B")
    cfg = sample_image.grub_cfg(root_a, root_b, "ab" * 32, "cd" * 32, grub_format, initrd=True)
    cfg = grub.add_oem_verity(cfg, partuuid="OEM-UUID", fs_size_4k=4000, root_hexdigest="ef" * 32, salt="12" * 32)
    linux = next(line for line in cfg.splitlines() if "vmlinuz.A" in line and "dm-0" in line).split(None, 2)[2]
    key = "dm" if grub_format == "dm" else "dm-mod.create"
    grub_quoted = re.sub(rf'(?<= ){re.escape(key)}="', f'"{key}=', linux)  # GRUB's re-quoting: "dm=1 vroot ..."
    assert grub_quoted != linux

    def awk(program: str, text: str) -> str:
        return subprocess.run([str(sample_initramfs.BUSYBOX), "awk", program], input=text, capture_output=True,
                              text=True, check=True).stdout  # fmt: skip

    values = {line.split("=", 1)[1] for cmdline in (linux, grub_quoted)
              for line in awk(sample_initramfs.CMDLINE_AWK, cmdline).splitlines() if line.startswith(key + "=")}  # fmt: skip
    assert len(values) == 1
    plan = awk(sample_initramfs.DM_AWK if grub_format == "dm" else sample_initramfs.DM_MOD_AWK, values.pop())
    uid = str(root_a.guid).upper()
    assert plan.splitlines() == [
        "dev vroot ro",
        f"table 0 4128768 verity 0 PARTUUID={uid} PARTUUID={uid} 4096 4096 516096 516096 sha256 {'ab' * 32} {'cd' * 32}",
        "dev oemroot ro",
        f"table 0 32000 verity 0 PARTUUID=OEM-UUID PARTUUID=OEM-UUID 4096 4096 4000 4000 sha256 {'ef' * 32} {'12' * 32}",
    ]
