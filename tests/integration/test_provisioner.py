"""The shipped provisioner against a loop-mounted sample image, with reboots simulated: its resume logic.

Each "boot" runs tests/vm_boot.py in a private mount namespace: the static
executable `build-provisioner` makes, started as the startup script starts
it; an exit 3 with its reboot request is a reboot, followed by `resume`. A
simulation proves nothing about systemd, the shutdown unit or the guest's
mounts: the whole build with its reboots runs for real, the shipped binary
under systemd in a QEMU guest, in tests/guest/test_rehearsal.py. What stays here
is quick logic the rehearsal does not reach: resume after a failed step,
a refused second run, the environment of a VM that has its own
LD_LIBRARY_PATH, the installer step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import gpt
from cos_customizer.provisioner.config import (
    ProvisionerConfig,
    RunScriptArgs,
)
from cos_customizer.provisioner.target import Target, is_mountpoint
from cos_customizer.runner import CommandError
from tests.integration.test_local_build import cat, exists
from tests.shipped import shipped_provisioner
from tests.vm_boot import VM_ENV

REPO = Path(__file__).resolve().parents[2]
root_only = pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices, mounts and namespaces")


class VM:
    def __init__(self, tmp: Path, image: Path, config: ProvisionerConfig) -> None:
        self.tmp, self.image = tmp, image
        self.config_file = tmp / "config.json"
        self.config_file.write_text(json.dumps(config.to_json()))
        self.systemctl_log = tmp / "systemctl.log"
        self.systemctl = tmp / "systemctl"
        self.systemctl_history = tmp / "systemctl.history"
        self.systemctl.write_text(
            f'#!/bin/sh\necho "$@" >> {self.systemctl_log}\necho "$@" >> {self.systemctl_history}\n'
        )
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
            "provisioner": str(shipped_provisioner()),
        }))  # fmt: skip
        argv = ["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child", "--",
                sys.executable, "-m", "tests.vm_boot", str(spec)]  # fmt: skip
        with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.output.append(line.rstrip("\n"))
                on_line(line)
        return proc.returncode

    @property
    def systemctl_log_history(self) -> list[str]:
        """Every systemctl call of every boot."""
        return self.systemctl_history.read_text().splitlines() if self.systemctl_history.exists() else []

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
def test_scripts_get_the_vms_environment_not_the_loaders(tmp_path: Path, sample_raw: Path) -> None:
    """What the rehearsal (tests/guest/test_rehearsal.py: the whole build with its reboots, on real systemd) cannot
    show: its guest has no LD_LIBRARY_PATH of its own. Here the "VM" has one (VM_ENV), and a script gets that
    value, not the frozen binary's, and nothing its loaders (PyInstaller, staticx) add."""
    image = sample_copy(sample_raw, tmp_path)
    archive = context_archive(tmp_path, {"env.sh": "env > /var/lib/script-env\n"})
    config = ProvisionerConfig(build_contexts=(("user", str(archive)),)).with_step(
        RunScriptArgs(build_context="user", path="env.sh", env=("GREETING=hi",))
    )
    vm = VM(tmp_path, image, config)
    assert vm.provision() == 0, "\n".join(vm.output)
    state = gpt.read_table(image).partition(1)
    env_text = cat(image, state.first * 512, "/var_overlay/lib/script-env")
    script_env = dict(line.split("=", 1) for line in env_text.splitlines() if "=" in line)
    assert script_env["LD_LIBRARY_PATH"] == VM_ENV["LD_LIBRARY_PATH"]
    assert script_env["VM_MARKER"] == VM_ENV["VM_MARKER"]
    assert script_env["GREETING"] == "hi"
    assert not [key for key in script_env if key.startswith(("_PYI", "_MEI", "STATICX", "LD_LIBRARY_PATH_ORIG"))]


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
def test_a_larger_disk_alone_moves_no_partition_and_costs_no_reboot(tmp_path: Path, sample_raw: Path) -> None:
    """As the original's relocatePartitions: without ReclaimSDA3 and an OEM size the table is left alone."""
    image = sample_copy(sample_raw, tmp_path)
    os.truncate(image, 12 << 30)
    archive = context_archive(tmp_path, {"touch.sh": "touch /var/lib/touched\n"})
    config = ProvisionerConfig(build_contexts=(("user", str(archive)),)).with_step(
        RunScriptArgs(build_context="user", path="touch.sh")
    )
    vm = VM(tmp_path, image, config)
    assert vm.provision() == 0, "\n".join(vm.output)
    assert vm.boots == 1
    assert gpt.read_table(image).partitions == gpt.read_table(sample_raw).partitions
    assert exists(image, gpt.read_table(image).partition(1).first * 512, "/var_overlay/lib/touched")


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


@root_only
@pytest.mark.root
@pytest.mark.parametrize(
    ("pkgspec", "top_workdir", "expected_spec"),
    [
        ("pkgspec", "", "/var/lib/.cos-customizer/user/pkgspec"),
        ("gs://my-bucket/spec.tar.gz", "/var/lib/anthos", "gs://my-bucket/spec.tar.gz"),
    ],
)
def test_install_packages_fetches_and_runs_the_installer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pkgspec: str, top_workdir: str, expected_spec: str
) -> None:
    """InstallPackages as the original: the release archive (the original's bucket and version, read with
    the VM's token) unpacked in the state directory, its anthos_installer run from the state directory's
    bin/ (bind-remounted exec: /var is noexec here, as on COS) with the original's arguments; after the
    cleanup only what the installer installed is left."""
    from cos_customizer.provisioner import cleanup, steps
    from cos_customizer.provisioner.config import InstallPackagesArgs
    from cos_customizer.provisioner.state import State
    from cos_customizer.provisioner.target import Target
    from tests.unit.test_download import standins

    root = tmp_path / "root"
    for directory in ("bin", "proc", "var"):
        (root / directory).mkdir(parents=True)
    subprocess.run(["cp", "/bin/busybox", str(root / "bin/busybox")], check=True)
    (root / "bin/sh").symlink_to("busybox")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "anthos_installer").write_text(
        '#!/bin/sh\necho "installing with $*"\nmkdir -p /var/lib/installed\necho "$*" > /var/lib/installed/args\n'
    )
    (staging / "anthos_installer").chmod(0o755)
    (staging / "README").write_text("release notes\n")
    archive = tmp_path / "release.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(staging), "anthos_installer", "README"], check=True)
    # src/cmd/cos_customizer/install_packages.go: anthosInstallerReleaseBucket, anthosInstallerVersion
    bucket, version = "cos-anthos-builds-us", "anthos_installer-linux-amd64-v0.0.1-bb7e04e.tar.gz"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,nosuid,nodev", "tmpfs", str(root / "var")], check=True)
    try:
        (root / "var/lib/.cos-customizer/user/pkgspec").mkdir(parents=True)
        said: list[str] = []
        target = Target(root=root, disk=tmp_path / "disk", partition_template="", chroot=True)
        context = steps.Context(target, State(root / "var/lib/.cos-customizer", ProvisionerConfig()), said.append)
        # What anthos-installer-install writes (AnthosInstallerDir empty: the provisioner's state directory).
        args = InstallPackagesArgs(build_context="user", pkg_spec_url=pkgspec, top_work_dir=top_workdir,
                                   anthos_installer_version=version, anthos_installer_release_bucket=bucket)  # fmt: skip
        with standins(monkeypatch) as cloud:
            cloud.objects[bucket, version] = archive.read_bytes()
            steps.install_packages(context, args)
        ran = (root / "var/lib/installed/args").read_text()
        # anthos_installer_install_script.go: BIN_DIR=<AnthosInstallerDir>/bin; the installer's arguments
        # -pkgspec-url=, -build-contextdir=, -top-workdir= (the original leaves BUILD_CONTEXT_DIR empty, a bug).
        assert ran == (
            f"install -pkgspec-url={expected_spec} -build-contextdir=/var/lib/.cos-customizer/user "
            f"-top-workdir={top_workdir}\n"
        )
        assert said == [f"Installing packages from {pkgspec}", "installing with " + ran.strip(),
                        f"Done installing the packages from {pkgspec}"]  # fmt: skip
        state_dir = root / "var/lib/.cos-customizer"
        assert {p.name for p in state_dir.iterdir()} == {"README", "anthos_installer", "bin", "user", version}
        assert str(state_dir / "bin") not in Path("/proc/self/mounts").read_text()  # unmounted after the run
        cleanup.clean(root)
        assert sorted(str(p.relative_to(root)) for p in (root / "var").rglob("*")) == [
            "var/lib", "var/lib/installed", "var/lib/installed/args"
        ]  # fmt: skip
    finally:
        subprocess.run(["umount", "-R", str(root / "var")], check=False)


@root_only
def test_roots_tmpfs_goes_even_while_a_process_is_inside(tmp_path: Path) -> None:
    """The provisioner's last unmount (its tmpfs on /root) does not fail the build when a process still has
    its directory there (the sample guest's console login did, and `umount` said "target is busy")."""
    target = Target(root=tmp_path)
    target.mount_tmpfs("/root")
    home = target.path("/root")
    inside = subprocess.Popen(["sleep", "60"], cwd=home)
    try:
        with pytest.raises(CommandError, match="busy"):
            target.unmount(home)
        target.unmount(home, lazy=True)
        assert not is_mountpoint(home)
    finally:
        inside.kill()
        inside.wait()
        if is_mountpoint(home):
            subprocess.run(["umount", "--lazy", str(home)], check=False)
