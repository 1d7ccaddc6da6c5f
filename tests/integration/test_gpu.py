"""InstallGPU: setup_gpu.sh run by bash against stand-ins, compared with the Go original's contract.

The oracle is the original's gpu_setup_script.go and install_gpu_step.go
(GoogleCloudPlatform/cos-customizer, src/pkg/provisioner): the variables it
exports, the `docker run` arguments, the `-e` list, the pull retries, and
the download addresses runInstaller puts in the environment. `docker`,
`pgrep`, `sleep` and `journalctl` are stand-ins on PATH that record what
they get; `mount` is the real one. Each run is in a private mount
namespace where the install directory is on a noexec tmpfs (so the driver's
programs only run after the bind+exec remount), /proc/sys/kernel is a tmpfs
(the script writes /proc/sys/kernel/softlockup_panic as shipped) and /mnt is
a tmpfs with or without the scratch disk's directory; setup_gpu.sh is copied out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.provisioner import gpu, steps
from cos_customizer.provisioner.config import InstallGPUArgs

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for mount namespaces and mounts"),
]

CONTAINER = "gcr.io/cos-cloud/cos-gpu-installer:v20230815"
RUN_FILE = "NVIDIA-Linux-x86_64-450.51.06.run"
DEPS_PREFIX = "gs://my-builds/build-7/gcs_files"


# The original's values, written out from its source.
def original_docker_run(install_dir: str, container: str, scratch: bool = True) -> list[str]:
    """gpu_setup_script.go's docker_run_cmd, word by word."""
    volumes = ["--volume", f"{install_dir}:/usr/local/nvidia", "--volume", "/dev:/dev", "--volume", "/:/root"]
    if scratch:
        volumes += ["--volume", "/mnt/disks/scratch/gpu:/toolchain"]
    return [
        "run", "--rm", "--privileged", "--net=host", "--pid=host", *volumes,
        "-e", "TOOLCHAIN_PKG_DIR",
        "-e", "NVIDIA_DRIVER_VERSION",
        "-e", "NVIDIA_DRIVER_MD5SUM",
        "-e", "NVIDIA_INSTALL_DIR_HOST",
        "-e", "COS_NVIDIA_INSTALLER_CONTAINER",
        "-e", "NVIDIA_INSTALL_DIR_CONTAINER",
        "-e", "ROOT_MOUNT_DIR",
        "-e", "COS_DOWNLOAD_GCS",
        "-e", "GPU_INSTALLER_DOWNLOAD_URL",
        container,
    ]  # fmt: skip


def original_exports(version: str, md5sum: str, install_dir: str, container: str) -> dict[str, str]:
    return {
        "NVIDIA_DRIVER_VERSION": version,
        "NVIDIA_DRIVER_MD5SUM": md5sum,
        "NVIDIA_INSTALL_DIR_HOST": install_dir,
        "COS_NVIDIA_INSTALLER_CONTAINER": container,
        "NVIDIA_INSTALL_DIR_CONTAINER": "/usr/local/nvidia",
        "ROOT_MOUNT_DIR": "/root",
        "TOOLCHAIN_PKG_DIR": "/toolchain",
        "SCRATCH_DISK_LOCATION": "/mnt/disks/scratch/gpu",
    }


ORIGINAL_PULL_ATTEMPTS = 10

DOCKER = """#!{python}
import json, os, sys
from pathlib import Path

record = Path({record!r})
args = sys.argv[1:]
calls = record / "docker.jsonl"
with calls.open("a") as out:
    out.write(json.dumps({{"argv": args, "env": dict(os.environ)}}) + "\\n")
if args[0] == "pull":
    pulls = sum(json.loads(line)["argv"][0] == "pull" for line in calls.read_text().splitlines())
    sys.exit(7 if pulls <= int((record / "pull-failures").read_text()) else 0)
if args[0] == "run":
    # What the installer container leaves in the host's install directory.
    host = next(a for a in args if a.endswith(":/usr/local/nvidia")).rsplit(":", 1)[0]
    if (record / "run-fails").exists():
        Path(host, "nvidia-installer.log").write_text("the installer's own log\\n")
        sys.exit(1)
    os.makedirs(Path(host, "bin"), exist_ok=True)
    for name in ("nvidia-smi", "nvidia-persistenced"):
        tool = Path(host, "bin", name)
        tool.write_text(f'#!/bin/sh\\necho "{{name}} $*" >> {{record}}/ran\\n')
        tool.chmod(0o755)
"""
RECORDER = '#!/bin/sh\necho "{name} $*" >> {record}/ran\n{tail}'
NAMESPACE = """set -e
mount -t tmpfs -o noexec,nosuid,nodev tmpfs "$1"
mount -t tmpfs tmpfs /proc/sys/kernel
echo 0 > /proc/sys/kernel/softlockup_panic
mount -t tmpfs tmpfs /mnt
if [ "$2" = scratch ]; then mkdir -p /mnt/disks/scratch/gpu; fi
var=$1 record=$3
shift 3
set +e
"$@"
status=$?
cat /proc/sys/kernel/softlockup_panic > "$record/softlockup_panic"
cp -p "$var"/*/setup_gpu.sh "$record/" 2>/dev/null || true
exit $status
"""


@dataclass
class Machine:
    tmp: Path
    record: Path
    standins: Path
    var: Path  # a noexec tmpfs in each run
    install_dir: str

    def run(self, argv: list[str], env: dict[str, str], *, scratch: bool) -> subprocess.CompletedProcess[str]:
        wrapper = ["unshare", "--mount", "--propagation", "private", "--fork", "--", "bash", "-c", NAMESPACE,
                   "namespace", str(self.var), "scratch" if scratch else "none", str(self.record)]  # fmt: skip
        return subprocess.run([*wrapper, *argv], env=env, cwd=REPO, capture_output=True, text=True, check=False)

    @property
    def path(self) -> str:
        return f"{self.standins}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    def docker_calls(self) -> list[dict[str, object]]:
        calls = self.record / "docker.jsonl"
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    def docker_run(self) -> tuple[list[str], dict[str, str]]:
        runs = [c for c in self.docker_calls() if c["argv"][0] == "run"]  # type: ignore[index]
        assert len(runs) == 1
        return runs[0]["argv"], runs[0]["env"]  # type: ignore[return-value]

    def container_env(self) -> dict[str, str]:
        """What the container sees: `docker run -e NAME` passes NAME only when it is set."""
        argv, env = self.docker_run()
        names = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-e"]
        return {name: env[name] for name in names if name in env}

    def ran(self) -> list[str]:
        ran = self.record / "ran"
        return ran.read_text().splitlines() if ran.exists() else []

    def softlockup_panic(self) -> str:
        return (self.record / "softlockup_panic").read_text().strip()


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    record, standins, var = tmp_path / "record", tmp_path / "bin", tmp_path / "var lib"
    for directory in (record, standins, var):
        directory.mkdir()
    (record / "pull-failures").write_text("0")
    (standins / "docker").write_text(DOCKER.format(python=sys.executable, record=str(record)))
    tails = {"pgrep": f"[ -e {record}/persistenced-running ] && exit 0\nexit 1\n", "sleep": "", "journalctl": ""}
    for name, tail in tails.items():
        (standins / name).write_text(RECORDER.format(name=name, record=record, tail=tail))
    for tool in standins.iterdir():
        tool.chmod(0o755)
    return Machine(tmp_path, record, standins, var, f"{var}/nvidia dir")


RUNNER = """
import json, sys
from pathlib import Path
from cos_customizer.provisioner import steps
from cos_customizer.provisioner.config import InstallGPUArgs, ProvisionerConfig
from cos_customizer.provisioner.state import State
from cos_customizer.provisioner.target import Target

args = InstallGPUArgs(**json.loads(sys.argv[1]))
context = steps.Context(Target(), State(Path(sys.argv[2]), ProvisionerConfig()), print)
try:
    steps.install_gpu(context, args)
except steps.StepFailed as err:
    print(f"StepFailed: {err}")
    sys.exit(1)
"""

# What the PyInstaller and staticx loaders add to the provisioner's environment.
LOADER_ENV = {
    "_PYI_APPLICATION_HOME_DIR": "/tmp/_MEI4242",
    "_MEIPASS2": "/tmp/_MEI4242",
    "STATICX_PROG_PATH": "/mnt/disks/cidata/provisioner",
    "LD_LIBRARY_PATH": "/tmp/_MEI4242",
    "LD_LIBRARY_PATH_ORIG": "/usr/local/nvidia/lib64",
}


def run_step(machine: Machine, args: InstallGPUArgs) -> subprocess.CompletedProcess[str]:
    """The InstallGPU runner in its own process, with the VM's environment as the loaders leave it."""
    fields = {"nvidia_driver_version": args.nvidia_driver_version, "nvidia_driver_md5sum": args.nvidia_driver_md5sum,
              "nvidia_install_dir_host": args.nvidia_install_dir_host,
              "nvidia_installer_container": args.nvidia_installer_container, "gcs_deps_prefix": args.gcs_deps_prefix}  # fmt: skip
    env = {"PATH": machine.path, "HOME": "/root", "FROM_THE_VM": "kept", **LOADER_ENV}
    argv = [sys.executable, "-c", RUNNER, json.dumps(fields), str(machine.tmp / "state")]
    return machine.run(argv, env, scratch=True)


@pytest.mark.parametrize(
    ("version", "prefix", "expected_version", "download", "installer_url"),
    [
        (
            RUN_FILE,
            DEPS_PREFIX,
            "450.51.06",
            # install_gpu_step.go runInstaller: "https://storage.googleapis.com/" + prefix without gs://,
            # and for a .run version that + "/" + the .run name.
            "https://storage.googleapis.com/my-builds/build-7/gcs_files",
            "https://storage.googleapis.com/my-builds/build-7/gcs_files/NVIDIA-Linux-x86_64-450.51.06.run",
        ),
        ("535.104.05", "", "535.104.05", "", ""),
    ],
)
def test_the_step_runs_the_installer_as_the_original(
    machine: Machine, version: str, prefix: str, expected_version: str, download: str, installer_url: str
) -> None:
    md5sum = "0123'456789abcdef0123456789abcdef"
    args = InstallGPUArgs(nvidia_driver_version=version, nvidia_driver_md5sum=md5sum,
                          nvidia_install_dir_host=machine.install_dir, nvidia_installer_container=CONTAINER,
                          gcs_deps_prefix=prefix)  # fmt: skip
    result = run_step(machine, args)
    assert result.returncode == 0, result.stdout + result.stderr
    argv, env = machine.docker_run()
    assert argv == original_docker_run(machine.install_dir, CONTAINER)
    exports = original_exports(expected_version, md5sum, machine.install_dir, CONTAINER)
    assert machine.container_env() == {
        **{name: exports[name] for name in original_docker_run("", "") if name in exports},
        "COS_DOWNLOAD_GCS": download,
        "GPU_INSTALLER_DOWNLOAD_URL": installer_url,
    }
    assert {name: env[name] for name in exports} == exports
    # The environment is the VM's less the loaders' variables (child_env), plus the two addresses.
    assert env["FROM_THE_VM"] == "kept"
    assert env["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64"
    assert not {"_PYI_APPLICATION_HOME_DIR", "_MEIPASS2", "STATICX_PROG_PATH", "LD_LIBRARY_PATH_ORIG"} & set(env)
    # One pull, the driver's tools run from the (noexec) install directory, softlockup_panic set.
    assert [c["argv"] for c in machine.docker_calls()] == [["pull", CONTAINER], argv]
    assert machine.ran() == ["nvidia-smi ", "pgrep -f nvidia-persistenced", "nvidia-persistenced --verbose"]
    assert machine.softlockup_panic() == "1"
    script = machine.record / "setup_gpu.sh"  # as it was in the install directory
    assert script.stat().st_mode & 0o777 == 0o744
    assert "COS_DOWNLOAD_GCS=" not in script.read_text()  # given by the run, not kept in the image
    assert f"Installing GPU driver {expected_version} with {machine.install_dir}/setup_gpu.sh" in result.stdout


def test_the_script_runs_at_boot_with_an_empty_environment(machine: Machine) -> None:
    """As a user runs it at every boot: no scratch disk, no download addresses, only a PATH."""
    args = InstallGPUArgs(nvidia_driver_version=RUN_FILE, nvidia_install_dir_host=machine.install_dir,
                          nvidia_installer_container=CONTAINER, gcs_deps_prefix=DEPS_PREFIX)  # fmt: skip
    staged = machine.tmp / "setup_gpu.sh"
    staged.write_text(gpu.setup_script(args, "450.51.06"))
    # The script in the install directory as the image has it, then run with nothing but a PATH.
    script = f"{machine.install_dir}/setup_gpu.sh"
    boot = ["bash", "-c", 'mkdir -p "${0%/*}" && cp "$1" "$0" && exec env -i PATH="$2" /bin/bash "$0"',
            script, str(staged), machine.path]  # fmt: skip
    result = machine.run(boot, {"PATH": machine.path}, scratch=False)
    assert result.returncode == 0, result.stdout + result.stderr
    argv, env = machine.docker_run()
    assert argv == original_docker_run(machine.install_dir, CONTAINER, scratch=False)
    exports = original_exports("450.51.06", "", machine.install_dir, CONTAINER)
    assert machine.container_env() == {name: exports[name] for name in original_docker_run("", "") if name in exports}
    assert not {"COS_DOWNLOAD_GCS", "GPU_INSTALLER_DOWNLOAD_URL"} & set(env)
    assert machine.ran() == ["nvidia-smi ", "pgrep -f nvidia-persistenced", "nvidia-persistenced --verbose"]
    assert machine.softlockup_panic() == "1"

    # The next boot, with nvidia-persistenced already running: it is not started twice.
    (machine.record / "persistenced-running").touch()
    (machine.record / "ran").unlink()
    (machine.record / "docker.jsonl").unlink()
    assert machine.run(boot, {"PATH": machine.path}, scratch=False).returncode == 0
    assert machine.ran() == ["nvidia-smi ", "pgrep -f nvidia-persistenced"]


@pytest.mark.parametrize("failures", [0, 1, 3, ORIGINAL_PULL_ATTEMPTS - 1])
def test_the_pull_is_retried(machine: Machine, failures: int) -> None:
    (machine.record / "pull-failures").write_text(str(failures))
    args = InstallGPUArgs(nvidia_driver_version="535.104.05", nvidia_install_dir_host=machine.install_dir,
                          nvidia_installer_container=CONTAINER)  # fmt: skip
    assert run_step(machine, args).returncode == 0
    assert [c["argv"][0] for c in machine.docker_calls()] == ["pull"] * (failures + 1) + ["run"]  # type: ignore[index]
    assert [line for line in machine.ran() if line.startswith("sleep")] == ["sleep 2"] * failures


def test_a_pull_that_never_works_fails_with_dockers_status_and_journal(machine: Machine) -> None:
    (machine.record / "pull-failures").write_text("100")
    args = InstallGPUArgs(nvidia_driver_version="535.104.05", nvidia_install_dir_host=machine.install_dir,
                          nvidia_installer_container=CONTAINER)  # fmt: skip
    result = run_step(machine, args)
    assert result.returncode == 1
    assert f"StepFailed: installing GPU drivers failed: {machine.install_dir}/setup_gpu.sh exited with status 7" in (
        result.stdout
    )
    assert [c["argv"] for c in machine.docker_calls()] == [["pull", CONTAINER]] * ORIGINAL_PULL_ATTEMPTS
    assert machine.ran() == ["sleep 2"] * ORIGINAL_PULL_ATTEMPTS + ["journalctl -u docker.service --no-pager"]
    assert machine.softlockup_panic() == "0"


def test_a_failed_install_shows_the_installer_log(machine: Machine) -> None:
    (machine.record / "run-fails").touch()
    args = InstallGPUArgs(nvidia_driver_version="535.104.05", nvidia_install_dir_host=machine.install_dir,
                          nvidia_installer_container=CONTAINER)  # fmt: skip
    result = run_step(machine, args)
    assert result.returncode == 1
    assert "the installer's own log" in result.stdout
    assert machine.ran() == []
    assert machine.softlockup_panic() == "0"


def test_the_script_quotes_every_value() -> None:
    args = InstallGPUArgs(nvidia_driver_version="535.104.05", nvidia_driver_md5sum="$(reboot)'\"",
                          nvidia_install_dir_host="/var/lib/my nvidia;x", nvidia_installer_container="gcr.io/a b:1")  # fmt: skip
    script = gpu.setup_script(args, "535.104.05")
    env = subprocess.run(["bash", "-c", script.split("# Programs run")[0] + "env -0"], capture_output=True, check=True)
    seen = dict(item.split("=", 1) for item in env.stdout.decode().split("\0") if item)
    assert seen["NVIDIA_DRIVER_MD5SUM"] == "$(reboot)'\""
    assert seen["NVIDIA_INSTALL_DIR_HOST"] == "/var/lib/my nvidia;x"
    assert seen["COS_NVIDIA_INSTALLER_CONTAINER"] == "gcr.io/a b:1"


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        # install_gpu_step.go: the .run name without ".run", split on "-", must have 4 fields; the 4th.
        ("NVIDIA-Linux-x86_64-450.51.06.run", "450.51.06"),
        ("NVIDIA-Linux-aarch64-535.run", "535"),
        ("NVIDIA-Linux-x86_64-450.51.06-grid.run", None),
        ("NVIDIA-450.51.06.run", None),
        ("535.104.05", "535.104.05"),
    ],
)
def test_driver_version_of_an_installer_name(version: str, expected: str | None) -> None:
    assert gpu.driver_version(version) == expected


def test_a_malformed_installer_name_fails_the_step(tmp_path: Path) -> None:
    from cos_customizer.provisioner.config import ProvisionerConfig
    from cos_customizer.provisioner.state import State
    from cos_customizer.provisioner.target import Target

    context = steps.Context(Target(root=tmp_path), State(tmp_path / "state", ProvisionerConfig()), print)
    args = InstallGPUArgs(nvidia_driver_version="NVIDIA-Linux-x86_64-450.51.06-grid.run",
                          nvidia_installer_container=CONTAINER)  # fmt: skip
    with pytest.raises(
        steps.StepFailed, match=r"malformed nvidia installer: 'NVIDIA-Linux-x86_64-450\.51\.06-grid\.run'"
    ):
        steps.install_gpu(context, args)
    assert not (tmp_path / "var").exists()
