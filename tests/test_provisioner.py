"""The provisioner against a loop-mounted sample image, with reboots simulated.

Each "boot" runs tests/vm_boot.py in a private mount namespace; an exit 3 is
a reboot, followed by `resume`. The result must equal the local executor's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cos_customizer.disk import ext, gpt, grub, loop
from cos_customizer.provisioner.config import (
    BootDisk,
    DisableAutoUpdateArgs,
    InstallGPUArgs,
    ProvisionerConfig,
    RunScriptArgs,
    SealOEMArgs,
)
from cos_customizer.provisioner.steps import gpu_script
from tests.test_local_build import SCRIPT, cat, exists, run_build, verity_verify

REPO = Path(__file__).resolve().parents[1]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mounts and namespaces")


class VM:
    def __init__(self, tmp: Path, image: Path, config: ProvisionerConfig) -> None:
        self.tmp, self.image = tmp, image
        self.config_file = tmp / "config.json"
        self.config_file.write_text(json.dumps(config.to_json()))
        self.systemctl_log = tmp / "systemctl.log"
        self.systemctl = tmp / "systemctl"
        self.systemctl.write_text(f'#!/bin/sh\necho "$@" >> {self.systemctl_log}\n')
        self.systemctl.chmod(0o755)
        self.boots = 0
        self.output: list[str] = []

    def boot(self, mode: str, on_line: Callable[[str], None] = lambda _: None) -> int:
        self.boots += 1
        work = self.tmp / f"boot{self.boots}"
        work.mkdir()
        spec = work / "spec.json"
        spec.write_text(json.dumps({
            "image": str(self.image), "workdir": str(work), "mode": mode, "config": str(self.config_file),
            "systemctl": str(self.systemctl), "systemctl_log": str(self.systemctl_log),
        }))  # fmt: skip
        argv = ["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child", "--",
                sys.executable, "-m", "tests.vm_boot", str(spec)]  # fmt: skip
        with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.output.append(line.rstrip("\n"))
                on_line(line)
        return proc.returncode

    def provision(self, on_line: Callable[[str], None] = lambda _: None, max_boots: int = 8) -> int:
        code = self.boot("run", on_line)
        while code == 3 and self.boots < max_boots:
            code = self.boot("resume", on_line)
        return code


def sample_copy(sample: Path, tmp: Path, name: str = "disk.raw") -> Path:
    image = tmp / name
    subprocess.run(["cp", "--sparse=always", str(sample), str(image)], check=True)
    return image


def context_archive(tmp: Path, scripts: dict[str, str]) -> Path:
    directory = tmp / "context"
    directory.mkdir()
    for name, text in scripts.items():
        (directory / name).write_text(text)
    archive = tmp / "user_build_context.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(directory), "."], check=True)
    return archive


@root_only
@pytest.mark.root
def test_provisioner_with_reboots_equals_the_local_executor(tmp_path: Path, sample_raw: Path) -> None:
    image = sample_copy(sample_raw, tmp_path)
    archive = context_archive(tmp_path, {"preload.sh": SCRIPT})
    config = (
        ProvisionerConfig(build_contexts=(("user", str(archive)),), boot_disk=BootDisk("2047M", 262144, True, True))
        .with_step(RunScriptArgs(build_context="user", path="preload.sh", env=("GREETING=hi",)))
        .with_step(SealOEMArgs())
        .with_step(DisableAutoUpdateArgs())
    )
    vm = VM(tmp_path, image, config)

    def grow_when_asked(line: str) -> None:
        if "waiting for the boot disk size to change" in line:
            os.truncate(image, 12 << 30)  # what the workflow's resize-disk step does

    code = vm.provision(grow_when_asked)
    log = "\n".join(vm.output)
    assert code == 0, log
    assert vm.boots == 4, log  # switch root, shrink ROOT-A, relocate at shutdown, then the steps
    assert "BuildSucceeded:" in log
    assert "BuildStatus: waiting for the boot disk size to change" in log
    assert "runs ExecStop=/bin/bash -c '" in log and "handle-disk-layout --plan=/tmp/cos-customizer-layout.json" in log
    assert "BuildStatus: hello" not in log
    # The same build with the local executor, from the same source image.
    (tmp_path / "local").mkdir()
    local = run_build(tmp_path / "local", sample_raw, [["run-script", "-script=preload.sh", "-env=GREETING=hi"],
                      ["seal-oem"], ["disable-auto-update"]], ["-oem-size=1G", "-disk-size-gb=12"], "out.raw")  # fmt: skip
    assert local.code == 0, local.err
    ours, theirs = gpt.read_table(image), gpt.read_table(local.raw)
    assert ours == theirs
    assert "No problems found" in subprocess.run(["sgdisk", "-v", str(image)], capture_output=True, text=True).stdout
    state, oem = ours.partition(1), ours.partition(8)
    for path in ("/var_overlay/lib/hello", "/hello", "/var_overlay/lib/greeting", "/var_overlay/lib/usr-write",
                 "/var_overlay/lib/sample-image", "/var_overlay/lib/checks"):  # fmt: skip
        assert cat(image, state.first * 512, path) == cat(local.raw, state.first * 512, path), path
    assert cat(image, oem.first * 512, "/hello") == "in the OEM\n"
    assert not exists(image, state.first * 512, "/var_overlay/lib/.cos-customizer")
    assert ext.info(image, oem.first * 512).size == 1 << 30
    assert ext.info(image, state.first * 512).size == ext.info(local.raw, state.first * 512).size
    cfg = grub.read_grub_cfg(image, ours.partition(12).first * 512)
    entries = grub.read_dm(cfg)
    assert [[t.name for t in line] for line in entries] == [["vroot", "oemroot"], ["vroot", "oemroot"]]
    assert verity_verify(image, oem, entries[0][1]).returncode == 0
    assert verity_verify(image, ours.partition(5), entries[1][0]).returncode == 0
    for line in (line for line in cfg.splitlines() if "cros_efi" in line):
        assert line.split().count("systemd.mask=update-engine.service") == 1
        assert line.split().count("systemd.mask=usr-share-oem.mount") == 1
    ext.check(image, state.first * 512)
    ext.check(image, oem.first * 512)
    deadline = time.monotonic() + 15  # the kernel frees autoclear loop devices asynchronously
    while loop.attached_to(image) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert loop.attached_to(image) == []


@root_only
@pytest.mark.root
def test_failed_step_reports_and_resume_never_repeats_a_finished_step(tmp_path: Path, sample_raw: Path) -> None:
    image = sample_copy(sample_raw, tmp_path)
    flaky = "if [ -e /var/lib/failed-once ]; then echo second try; exit 0; fi\ntouch /var/lib/failed-once\necho boom\nexit 7\n"
    archive = context_archive(tmp_path, {"append.sh": "echo x >> /var/lib/count\n", "flaky.sh": flaky})
    config = (
        ProvisionerConfig(build_contexts=(("user", str(archive)),))
        .with_step(RunScriptArgs(build_context="user", path="append.sh"))
        .with_step(RunScriptArgs(build_context="user", path="flaky.sh"))
    )
    vm = VM(tmp_path, image, config)
    assert vm.boot("run") == 1
    log = "\n".join(vm.output)
    assert "BuildStatus: boom" in log
    assert "BuildFailed: step 1 (RunScript): script flaky.sh failed with exit status 7" in log
    assert vm.boot("resume") == 0
    state = gpt.read_table(image).partition(1).first * 512
    assert cat(image, state, "/var_overlay/lib/count") == "x\n"
    assert "BuildStatus: second try" in "\n".join(vm.output)
    assert gpt.read_table(image).partitions == gpt.read_table(sample_raw).partitions


@root_only
@pytest.mark.root
def test_second_run_is_refused(tmp_path: Path, sample_raw: Path) -> None:
    image = sample_copy(sample_raw, tmp_path)
    archive = context_archive(tmp_path, {"slow.sh": "exit 9\n"})
    config = ProvisionerConfig(build_contexts=(("user", str(archive)),)).with_step(
        RunScriptArgs(build_context="user", path="slow.sh")
    )
    vm = VM(tmp_path, image, config)
    assert vm.boot("run") == 1
    assert vm.boot("run") == 1
    assert "a provisioning run already started here; use `resume`" in "\n".join(vm.output)


def test_gpu_script_quotes_values_and_reads_the_run_file_version() -> None:
    script = gpu_script(InstallGPUArgs(
        nvidia_driver_version="NVIDIA-Linux-x86_64-450.51.06.run", nvidia_driver_md5sum="ab'cd",
        nvidia_install_dir_host="/var/lib/my nvidia", nvidia_installer_container="gcr.io/x/y:1",
        gcs_deps_prefix="gs://bucket/dir/gcs_files"))  # fmt: skip
    assert "NVIDIA_DRIVER_VERSION=450.51.06\n" in script
    assert "NVIDIA_DRIVER_MD5SUM='ab'\"'\"'cd'\n" in script
    assert "NVIDIA_INSTALL_DIR_HOST='/var/lib/my nvidia'\n" in script
    assert (
        "NVIDIA_DRIVER_DOWNLOAD_URL=https://storage.googleapis.com/bucket/dir/gcs_files/NVIDIA-Linux-x86_64-450.51.06.run\n"
        in script
    )
    result = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr


@root_only
@pytest.mark.root
def test_install_packages_fetches_and_runs_the_installer(tmp_path: Path) -> None:
    """InstallPackages: the installer archive is fetched from the release location and run with the pkgspec."""
    from cos_customizer.provisioner import steps
    from cos_customizer.provisioner.config import InstallPackagesArgs
    from cos_customizer.provisioner.state import State
    from cos_customizer.provisioner.target import Target

    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    subprocess.run(["cp", "/bin/busybox", str(root / "bin/busybox")], check=True)
    (root / "bin/sh").symlink_to("busybox")
    (root / "proc").mkdir()
    (root / "var/lib/.cos-customizer/user/pkgspec").mkdir(parents=True)
    release = tmp_path / "release"
    (release / "staging").mkdir(parents=True)
    installer = release / "staging/anthos_installer"
    installer.write_text('#!/bin/sh\necho "installing with $*"\necho "$*" > /var/lib/anthos-installer/ran\n')
    installer.chmod(0o755)
    subprocess.run(["tar", "-czf", str(release / "installer-v1.tar.gz"), "-C", str(release / "staging"),
                    "anthos_installer"], check=True)  # fmt: skip
    said: list[str] = []
    target = Target(root=root, disk=tmp_path / "disk", partition_template="", chroot=True)
    context = steps.Context(target, State(root / "var/lib/.cos-customizer", ProvisionerConfig()), said.append)
    args = InstallPackagesArgs(build_context="user", pkg_spec_url="pkgspec", anthos_installer_version="installer-v1.tar.gz",
                               anthos_installer_release_bucket=f"file://{release}")  # fmt: skip
    steps.install_packages(context, args)
    ran = (root / "var/lib/anthos-installer/ran").read_text()
    assert ran == (
        "install --pkgspec-url=/var/lib/.cos-customizer/user/pkgspec --top-workdir=/var/lib/anthos-installer\n"
    )
    assert said == ["installing with " + ran.strip()]
