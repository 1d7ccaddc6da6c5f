"""Containers in local builds: the image's own containerd and dockerd, for scripts, with the host untouched.

The sample image with this machine's docker.io and containerd (`sample-image -with-containers`), a
real registry on 127.0.0.1 (Debian's docker-registry) holding a busybox image pushed by a small
independent client (`tests.registry`), and builds whose scripts pull, load, run, build and import.

Oracles: the OUTPUT image read by this machine's own dockerd and containerd running as root (a root
daemon as on a booted COS, not the build's rootless ones) in scratch namespaces; debugfs; the host's
`ip link`, `iptables-save` and `nft list ruleset`, byte for byte; /proc, /sys/fs/cgroup, losetup and
mountinfo for what a build may leave behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import ext, gpt, loop
from cos_customizer.executors.local import sandbox
from tests import registry
from tests.conftest import sh, sigint_as_from_a_terminal
from tests.integration.test_faults import MARK, force_cleanup, kill_when, leftovers

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices, mounts and namespaces"),
    pytest.mark.skipif(
        not all(Path(p).exists() for p in (registry.DOCKERD, registry.CONTAINERD, registry.REGISTRY_BINARY)),
        reason="needs Debian's docker.io, containerd and docker-registry (scripts/setup installs them)",
    ),
]

STATE, OEM = 1, 8


def host_network() -> str:
    """What a build must not change: the host's links, iptables and nftables rules."""
    parts = []
    for argv in (["ip", "-o", "link"], ["iptables-save"], ["ip6tables-save"], ["nft", "list", "ruleset"]):
        if shutil.which(argv[0]):
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]  # save dates
            parts.append(f"$ {' '.join(argv)} ({result.returncode})\n" + "\n".join(lines))
    return "\n".join(parts)


def build_cgroups() -> set[str]:
    return {p.name for p in Path("/sys/fs/cgroup").glob("*/cos-customizer-*") if len(p.name) == 23}


def inner_processes(seconds: float = 10.0) -> list[str]:
    """Processes running as the daemons' root (a host uid no one else has), but zombies: a killed build's
    last ones wait there for this machine's init to reap them, holding nothing. Given `seconds` to go."""
    deadline = time.monotonic() + seconds
    while True:
        found = []
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError, IndexError):
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
                if fields["Uid"].split()[0] == str(sandbox.INNER_BASE) and not fields["State"].startswith("Z"):
                    found.append(f"{status.parent.name} {fields['Name']} {fields['State']}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox as a layer and as a `docker save` archive (tag loaded:1)."""
    directory = tmp_path_factory.mktemp("images")
    registry.busybox_layer(directory / "busybox.tar")
    registry.docker_archive(directory / "loaded.tar", "loaded:1", [directory / "busybox.tar"])
    return directory


@pytest.fixture
def local_registry(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Iterator[registry.Registry]:
    with registry.Registry(tmp_path_factory.mktemp("registry")) as reg:  # outside the build's directory
        registry.push_image(reg, "bb", "1", [images / "busybox.tar"])
        yield reg


@dataclass
class Build:
    tmp: Path
    token: str
    env: dict[str, str]
    context: Path

    def cli(self, *argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cos_customizer", *map(str, argv)], env=self.env,
                              capture_output=True, text=True, check=False, timeout=timeout)  # fmt: skip

    def steps(self, source: Path, *scripts: str) -> None:
        argv: list[list[str | Path]] = [
            ["start-image-build", f"-build-context={self.context}", f"-image-file={source}"]
        ]
        argv += [["run-script", f"-script={name}"] for name in scripts]
        for args in argv:
            result = self.cli(*args)
            assert result.returncode == 0, result.stderr

    def finish(self, output: Path, *flags: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "cos_customizer", "finish-image-build", f"-output={output}", *flags]
        return subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=sigint_as_from_a_terminal)  # fmt: skip


@pytest.fixture
def build(tmp_path: Path, images: Path) -> Iterator[Build]:
    token = f"cosctr{uuid.uuid4().hex[:12]}"
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy2(images / "loaded.tar", context / "loaded.tar")
    env = {**os.environ, "HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "ws"), MARK: token}
    try:
        yield Build(tmp_path, token, env, context)
    finally:
        force_cleanup(token, tmp_path)


def run(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@contextlib.contextmanager
def state_of(image: Path, mount_point: Path) -> Iterator[Path]:
    """The output's STATE file system mounted read-write (the test's own copy) at `mount_point`."""
    part = gpt.read_table(image).partition(STATE)
    mount_point.mkdir(parents=True, exist_ok=True)
    options = ("loop", f"offset={part.first * 512}", f"sizelimit={part.size * 512}")
    with loop.mounted(str(image), mount_point, options=options):
        yield mount_point


PRELOAD = """set -euxo pipefail
docker pull {registry}/bb:1
docker load < loaded.tar
mkdir -p /var/lib/preload
docker run --rm -v /var/lib/preload:/out {registry}/bb:1 sh -c 'echo written by a container > /out/file; id -u > /out/uid'
docker run --rm --network=host {registry}/bb:1 sh -c 'echo on the host network'
mkdir -p /tmp/ctx
printf 'FROM loaded:1\\nRUN mkdir /d && touch /d/old\\nRUN rm -rf /d && mkdir /d && touch /d/new\\nRUN echo built > /built\\n' > /tmp/ctx/Dockerfile
DOCKER_BUILDKIT=0 docker build -q -t built:1 /tmp/ctx
ctr -n k8s.io images import loaded.tar
ctr -n k8s.io images pull --plain-http {registry}/bb:1
docker images --format '{{{{.Repository}}}}:{{{{.Tag}}}}'
echo preload done
"""


def test_a_build_preloads_with_pull_load_run_build_and_ctr_and_the_host_is_untouched(
    build: Build, containers_raw: Path, local_registry: registry.Registry
) -> None:
    (build.context / "preload.sh").write_text(PRELOAD.format(registry=f"localhost:{local_registry.port}"))
    build.steps(containers_raw, "preload.sh")
    before_net, before_cgroups = host_network(), build_cgroups()
    output = build.tmp / "out.raw"
    code, out = run(build.finish(output, "-allow-host-loopback"))
    assert code == 0, out
    assert "a script uses containers: starting the image's containerd and dockerd" in out
    assert "[run-script preload.sh] preload done" in out
    assert host_network() == before_net
    assert build_cgroups() == before_cgroups
    assert leftovers(build.token, build.tmp) == []
    assert inner_processes() == []

    offset = gpt.read_table(output).partition(STATE).first * 512
    device = ext.device(output, offset)
    assert sh("debugfs", "-R", "cat /var_overlay/lib/preload/file", device).stdout == "written by a container\n"
    assert sh("debugfs", "-R", "cat /var_overlay/lib/preload/uid", device).stdout == "0\n"
    stat = sh("debugfs", "-R", "stat /var_overlay/lib/preload/file", device).stdout
    assert "User:     0   Group:     0" in stat  # owned by uid 0 on disk, as a booted COS would have it

    # A root dockerd and containerd of this machine, on the output's STATE, see what was preloaded.
    with state_of(output, build.tmp / "state") as state:
        with registry.ScratchDockerd(build.tmp / "check-docker", data_root=state / "var_overlay/lib/docker") as dockerd:
            listed = dockerd.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
            assert sorted(listed) == sorted([f"localhost:{local_registry.port}/bb:1", "loaded:1", "built:1"])
            ran = dockerd.docker("run", "--rm", "--network=none", "built:1", "sh", "-c", "cat /built; ls /d")
            assert ran.stdout == "built\nnew\n"  # /d/old is gone: the opaque directory is read by a root daemon
        root = state / "var_overlay/lib/containerd"
        with registry.ScratchContainerd(build.tmp / "check-containerd", root=root) as containerd:
            names = containerd.ctr("-n", "k8s.io", "images", "ls", "-q").stdout.split()
            assert "docker.io/library/loaded:1" in names, names  # ctr names a docker archive's tags in full
            assert f"localhost:{local_registry.port}/bb:1" in names, names
            ran = containerd.ctr(
                "-n", "k8s.io", "run", "--rm", "docker.io/library/loaded:1", "check", "cat", "/etc/passwd"
            )
            assert ran.stdout.startswith("root:")


def test_a_second_build_runs_the_preloaded_image_without_pulling(
    build: Build, containers_raw: Path, local_registry: registry.Registry
) -> None:
    reference = f"localhost:{local_registry.port}/bb:1"
    (build.context / "pull.sh").write_text(f"set -e\ndocker pull {reference}\n")
    build.steps(containers_raw, "pull.sh")
    first = build.tmp / "first.raw"
    code, out = run(build.finish(first, "-allow-host-loopback"))
    assert code == 0, out
    local_registry._stop()  # nothing to pull from any more
    (build.context / "run.sh").write_text(
        f"set -e\ndocker run --rm --pull=never --network=none {reference} sh -c 'echo ran the preloaded image'\n"
    )
    build.steps(first, "run.sh")
    code, out = run(build.finish(build.tmp / "second.raw"))
    assert code == 0, out
    assert "[run-script run.sh] ran the preloaded image" in out


def test_a_script_that_uses_no_containers_starts_no_daemon(build: Build, containers_raw: Path) -> None:
    (build.context / "plain.sh").write_text("echo plain > /var/lib/plain\n")
    build.steps(containers_raw, "plain.sh")
    output = build.tmp / "out.raw"
    code, out = run(build.finish(output))
    assert code == 0, out
    assert "starting the image's" not in out
    device = ext.device(output, gpt.read_table(output).partition(STATE).first * 512)
    result = sh("debugfs", "-R", "stat /var_overlay/lib/containerd", device, check=False)
    assert "File not found" in result.stderr
    listing = sh("debugfs", "-R", "ls -p /var_overlay/lib/docker", device).stdout.split()  # the layout's mount point
    assert sorted(line.split("/")[5] for line in listing) == [".", ".."], listing


def test_containers_off_leaves_docker_without_a_daemon(build: Build, containers_raw: Path) -> None:
    (build.context / "docker.sh").write_text("docker version\n")
    build.steps(containers_raw, "docker.sh")
    code, out = run(build.finish(build.tmp / "out.raw", "-containers=off"))
    assert code == 1
    assert "Cannot connect to the Docker daemon at unix:///var/run/docker.sock" in out
    assert not (build.tmp / "out.raw").exists()


def test_containers_on_refuses_an_image_without_them(build: Build, sample_raw: Path) -> None:
    (build.context / "docker.sh").write_text("true\n")
    build.steps(sample_raw, "docker.sh")
    code, out = run(build.finish(build.tmp / "out.raw", "-containers=on"))
    assert code == 1
    assert out.strip().splitlines()[-1] == (
        "cos-customizer: error: -containers=on, but the image has no containerd or dockerd (no unit file names one "
        "and none is on /usr/bin, /usr/sbin, /bin, /sbin): use -containers=auto or off, or an image with them"
    )


def test_the_dry_run_plan_records_the_containers_mode(build: Build, containers_raw: Path) -> None:
    build.steps(containers_raw)
    result = build.cli("finish-image-build", f"-output={build.tmp / 'o.raw'}", "-dry-run", "-containers=off")
    assert result.returncode == 0, result.stderr
    assert '"containers": "off"' in result.stdout
    assert "containers: off (no container daemons for scripts)" in result.stderr
    bad = build.cli("finish-image-build", f"-output={build.tmp / 'o.raw'}", "-containers=maybe")
    assert bad.returncode == 1  # as every string flag's value check (the original refuses those after parsing)
    assert bad.stderr == 'cos-customizer: error: invalid value "maybe" for flag -containers: use one of auto, on, off\n'


STOPPERS = {
    "failing-script": ("exit 3", None),
    "sigterm": ("sleep 100000", signal.SIGTERM),
    "sigint": ("sleep 100000", signal.SIGINT),
    "timeout": ("sleep 100000", None),
}


@pytest.mark.parametrize("how", list(STOPPERS))
def test_stopping_a_build_while_a_container_runs_leaves_nothing(build: Build, containers_raw: Path, how: str) -> None:
    tail, sig = STOPPERS[how]
    script = f"{build.token}.sh"
    (build.context / script).write_text(
        f"set -e\ndocker load < loaded.tar\ndocker run -d --name keep loaded:1 sleep 100000\necho container started\n{tail}\n"
    )
    build.steps(containers_raw, script)
    before_net, before_cgroups = host_network(), build_cgroups()
    flags = ["-timeout=40s"] if how == "timeout" else []
    proc = build.finish(build.tmp / "out.raw", *flags)
    if sig is None:
        code, out = run(proc)
        lines = out.splitlines()
    else:
        lines = kill_when(proc, lambda line: "container started" in line, sig, seconds=240)
        code = proc.returncode
    assert code != 0, "\n".join(lines)
    assert "container started" in "\n".join(lines)
    assert not (build.tmp / "out.raw").exists()
    assert leftovers(build.token, build.tmp) == []
    assert inner_processes() == []
    assert build_cgroups() == before_cgroups
    assert host_network() == before_net
