"""`sample-image -with-containers`, and the container test helpers of tests/registry.py against the real
docker-registry, dockerd and containerd of this machine (Debian's docker.io, containerd, docker-registry)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.disk import ext, gpt, loop
from cos_customizer.executors.local import daemon_units
from cos_customizer.sample import containers as sample_containers
from cos_customizer.sample import image as sample_image
from tests import registry
from tests.conftest import CLI, sh
from tests.registry import Registry, ScratchContainerd, ScratchDockerd

HOST_RUNTIME = all(Path(host).exists() for _, host, _ in sample_containers.BINARIES)
needs_runtime = pytest.mark.skipif(
    not HOST_RUNTIME, reason="docker.io, containerd and runc are not installed (scripts/setup installs them)"
)
needs_registry = pytest.mark.skipif(
    not Path(registry.REGISTRY_BINARY).exists(), reason="docker-registry is not installed (scripts/setup installs it)"
)
needs_root = pytest.mark.skipif(not privilege.can_mount(), reason="needs root: unshare, mounts, containers")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _root_a(image: Path) -> str:
    return ext.device(image, gpt.read_table(image).partition(3).first * 512)


def _cat(image: Path, path: str) -> str:
    return sh("debugfs", "-R", f"cat {path}", _root_a(image)).stdout


def _dump(image: Path, paths: list[str], out: Path) -> dict[str, Path]:
    """Dump each ROOT-A file in `paths` with debugfs (one run), to files under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    dumped = {path: out / f"{index}.bin" for index, path in enumerate(paths)}
    commands = out / "commands"
    commands.write_text("".join(f'dump "{path}" "{local}"\n' for path, local in dumped.items()))
    sh("debugfs", "-f", commands, _root_a(image))
    return dumped


def _inside(host_library: str) -> str:
    """Where `sample_image` puts a host library: /lib/... and /lib64/... go under /usr."""
    return f"/usr{host_library}" if host_library.startswith(("/lib/", "/lib64/")) else host_library


@pytest.fixture(scope="module")
def containers_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sample image with the container runtime for this module; tests must not write it."""
    if not HOST_RUNTIME:
        pytest.skip("docker.io, containerd and runc are not installed (scripts/setup installs them)")
    path = tmp_path_factory.mktemp("sample-containers") / "cos.raw"
    sample_image.build(path, with_containers=True)
    return path


@needs_runtime
def test_runtime_binaries_are_the_hosts(containers_raw: Path, tmp_path: Path) -> None:
    wanted = {f"/{inside}": host for inside, host, _ in sample_containers.BINARIES}
    wanted["/usr/sbin/xtables-legacy-multi"] = "/usr/sbin/xtables-legacy-multi"
    dumped = _dump(containers_raw, list(wanted), tmp_path)
    for inside, host in wanted.items():
        assert dumped[inside].exists(), f"{inside} is not in ROOT-A"
        assert _sha256(dumped[inside]) == _sha256(Path(host).resolve()), inside
    # Debian's docker.io client, not the other client in /usr/local/bin.
    assert _sha256(dumped["/usr/bin/docker"]) == _sha256(Path("/usr/bin/docker"))
    listing = sh("debugfs", "-R", "ls -l /usr/bin", _root_a(containers_raw)).stdout
    for name in ("docker", "dockerd", "containerd", "containerd-shim-runc-v2", "ctr", "runc", "docker-init"):
        line = next(line for line in listing.splitlines() if line.split()[-1:] == [name])
        assert line.split()[1] == "100755", line  # regular executable files, not links to the host
    for link in sample_containers.IPTABLES_LINKS:
        stat = sh("debugfs", "-R", f"stat /usr/sbin/{link}", _root_a(containers_raw)).stdout
        assert "Type: symlink" in stat and 'Fast link dest: "xtables-legacy-multi"' in stat, stat
    modules = sh("debugfs", "-R", "ls /usr/lib/x86_64-linux-gnu/xtables", _root_a(containers_raw)).stdout.split()
    host_modules = os.listdir("/usr/lib/x86_64-linux-gnu/xtables")
    assert "libxt_conntrack.so" in host_modules
    assert set(host_modules) <= set(modules)


@needs_runtime
def test_units_and_docker_group(containers_raw: Path) -> None:
    units = "/usr/lib/systemd/system"
    containerd = _cat(containers_raw, f"{units}/containerd.service")
    socket = _cat(containers_raw, f"{units}/docker.socket")
    docker = _cat(containers_raw, f"{units}/docker.service")
    assert [line for line in containerd.splitlines() if line.startswith("ExecStart")] == [
        "ExecStart=/usr/bin/containerd"
    ]
    # COS's own line (a COS node's /usr/lib/systemd/system/docker.service, as daemon_units cites it)
    cos = daemon_units.COS_DEFAULT_UNITS[daemon_units.DOCKERD]
    assert [line for line in docker.splitlines() if line.startswith("ExecStart=")] == [
        line for line in cos.splitlines() if line.startswith("ExecStart=")
    ]
    for line in ("EnvironmentFile=-/etc/default/docker", "Delegate=yes", "KillMode=process", "Type=notify",
                 "Requires=docker.socket containerd.service", "[Install]"):  # fmt: skip
        assert line in docker.splitlines(), line
    for line in ("ListenStream=/var/run/docker.sock", "SocketMode=0660", "SocketGroup=docker"):
        assert line in socket.splitlines(), line
    assert "Delegate=yes" in containerd.splitlines()
    group = _cat(containers_raw, "/etc/group")
    assert group.splitlines() == ["root:x:0:", "chronos:x:1000:", "docker:x:412:chronos"]
    # Their state lives on STATE at run time: none of it is in ROOT-A.
    listing = sh("debugfs", "-R", "ls -p /etc", _root_a(containers_raw)).stdout
    assert "/docker/" not in listing and "/containerd/" not in listing


@needs_runtime
def test_runtime_libraries_are_in_root_a(containers_raw: Path, tmp_path: Path) -> None:
    libraries: set[str] = set()
    for host in ("/usr/sbin/dockerd", "/usr/sbin/runc", "/usr/sbin/xtables-legacy-multi",
                 "/usr/lib/x86_64-linux-gnu/xtables/libxt_conntrack.so"):  # fmt: skip
        for line in sh("ldd", host).stdout.splitlines():
            words = line.split()
            path = words[2] if len(words) >= 3 and words[1] == "=>" else words[0]
            if path.startswith("/"):
                libraries.add(path)
    assert {"/lib/x86_64-linux-gnu/libsystemd.so.0", "/lib/x86_64-linux-gnu/libseccomp.so.2"} <= libraries
    dumped = _dump(containers_raw, [_inside(library) for library in sorted(libraries)], tmp_path)
    for library in libraries:
        local = dumped[_inside(library)]
        assert local.exists(), f"{library} is not in ROOT-A"
        assert _sha256(local) == _sha256(Path(library).resolve()), library


@needs_runtime
def test_root_a_fits_and_checks(containers_raw: Path) -> None:
    table = gpt.read_table(containers_raw)
    ext.check(containers_raw, table.partition(3).first * 512)
    fs = ext.info(containers_raw, table.partition(3).first * 512)
    assert fs.label == "ROOT-A"
    stats = sh("dumpe2fs", "-h", _root_a(containers_raw)).stdout
    free = int(next(line for line in stats.splitlines() if line.startswith("Free blocks:")).split()[-1])
    assert free * 4096 > 1 << 30  # about 230 MiB used of 2 GiB
    assert containers_raw.stat().st_blocks * 512 < 400 << 20


def test_without_the_flag_there_is_no_runtime(sample_raw: Path) -> None:
    missing = sh("debugfs", "-R", "stat /usr/bin/dockerd", _root_a(sample_raw))
    assert "File not found" in missing.stderr
    assert "docker" not in _cat(sample_raw, "/etc/group")
    assert "File not found" in sh("debugfs", "-R", "ls /usr/lib/systemd", _root_a(sample_raw)).stderr
    assert "File not found" in sh("debugfs", "-R", "stat /usr/sbin/iptables", _root_a(sample_raw)).stderr


@needs_runtime
@pytest.mark.root
@needs_root
def test_chroot_runs_the_runtime(containers_raw: Path, tmp_path: Path) -> None:
    root_a = gpt.read_table(containers_raw).partition(3)
    target = tmp_path / "root"
    with loop.partition_mounted(containers_raw, offset=root_a.first * 512, size=root_a.size * 512, target=target):
        versions = {tool: sh("chroot", target, *tool.split()).stdout for tool in
                    ("docker --version", "dockerd --version", "containerd --version", "ctr --version",
                     "runc --version", "iptables -V", "docker-init --version")}  # fmt: skip
    assert versions["docker --version"] == sh("/usr/bin/docker", "--version").stdout
    assert versions["dockerd --version"] == sh("/usr/sbin/dockerd", "--version").stdout
    assert versions["iptables -V"].endswith("(legacy)\n")
    assert versions["runc --version"].startswith("runc version")
    assert all(versions.values())
    assert loop.attached_to(containers_raw) == []


def test_refused_without_the_host_runtime(cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "no-dockerd"
    monkeypatch.setattr(sample_containers, "BINARIES", (("usr/bin/dockerd", str(gone), "docker.io"),))
    result = cli("sample-image", "-with-containers", str(tmp_path / "c.raw"))
    assert (result.code, result.err) == (
        1,
        f"cos-customizer: error: -with-containers copies this machine's container runtime and {gone} is "
        "missing: apt-get install docker.io (scripts/setup does)\n",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@needs_runtime
def test_cli_with_containers(cli: CLI, tmp_path: Path) -> None:
    out = tmp_path / "s.raw"
    result = cli("sample-image", "-with-containers", str(out))
    assert result.code == 0, result.err
    assert "ExecStart=/usr/bin/containerd" in _cat(out, "/usr/lib/systemd/system/containerd.service")
    help_text = cli("sample-image", "-help")
    assert "-with-containers" in help_text.out + help_text.err


# The helpers of tests/registry.py.


def test_layers_are_deterministic(tmp_path: Path) -> None:
    registry.busybox_layer(tmp_path / "a.tar")
    registry.busybox_layer(tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    listing = sh("tar", "-tvf", tmp_path / "a.tar").stdout
    assert "bin/sh -> busybox" in listing and "drwxrwxrwt root/root" in listing
    assert "1970-01-01" in listing
    registry.random_layer(tmp_path / "r1.tar", 3 << 20, seed=1)
    registry.random_layer(tmp_path / "r2.tar", 3 << 20, seed=1)
    registry.random_layer(tmp_path / "r3.tar", 3 << 20, seed=2)
    assert _sha256(tmp_path / "r1.tar") == _sha256(tmp_path / "r2.tar") != _sha256(tmp_path / "r3.tar")
    sh("tar", "-xf", tmp_path / "r1.tar", "-C", tmp_path)
    blob = (tmp_path / "data/blob").read_bytes()
    assert len(blob) == 3 << 20
    assert len(gzip.compress(blob, 6)) > len(blob)  # incompressible


@needs_registry
def test_push_to_the_real_registry(tmp_path: Path) -> None:
    registry.busybox_layer(tmp_path / "bb.tar")
    with Registry(tmp_path / "registry") as reg:
        assert reg.url == f"http://127.0.0.1:{reg.port}" and reg.host == f"127.0.0.1:{reg.port}"
        digest = registry.push_image(reg, "bb", "1", [tmp_path / "bb.tar"])
        status, headers, body = reg.request("GET", "/v2/bb/manifests/1", headers={"Accept": registry.MANIFEST_V2})
        assert status == 200
        assert headers["Docker-Content-Digest"] == digest == "sha256:" + hashlib.sha256(body).hexdigest()
        manifest = json.loads(body)
        assert manifest["mediaType"] == registry.MANIFEST_V2
        assert json.loads(reg.request("GET", "/v2/_catalog")[2]) == {"repositories": ["bb"]}
        assert json.loads(reg.request("GET", "/v2/bb/tags/list")[2]) == {"name": "bb", "tags": ["1"]}
        status, _, layer = reg.request("GET", f"/v2/bb/blobs/{manifest['layers'][0]['digest']}")
        assert status == 200 and gzip.decompress(layer) == (tmp_path / "bb.tar").read_bytes()
        config = json.loads(reg.request("GET", f"/v2/bb/blobs/{manifest['config']['digest']}")[2])
        assert config["rootfs"]["diff_ids"] == ["sha256:" + _sha256(tmp_path / "bb.tar")]
        assert config["config"]["Cmd"] == ["sh"] and config["architecture"] == "amd64"
        # The same push again gives the same digest; a blob under a wrong digest is refused.
        assert registry.push_image(reg, "bb", "1", [tmp_path / "bb.tar"]) == digest
        location = reg.request("POST", "/v2/bb/blobs/uploads/", b"")[1]["Location"]
        wrong = location + ("&" if "?" in location else "?") + "digest=sha256:" + "0" * 64
        assert reg.request("PUT", wrong, b"not that", {"Content-Type": "application/octet-stream"})[0] == 400
        process = reg._process
    assert process is not None and process.poll() is not None
    assert "GET /v2/" in (tmp_path / "registry/registry.log").read_text()


@needs_runtime
@pytest.mark.root
@needs_root
def test_archive_loads_and_runs_in_a_scratch_dockerd(tmp_path: Path) -> None:
    registry.busybox_layer(tmp_path / "bb.tar")
    image_id = registry.docker_archive(tmp_path / "bb-archive.tar", "bb:1", [tmp_path / "bb.tar"])
    names = sh("tar", "-tf", tmp_path / "bb-archive.tar").stdout.split()
    assert {"manifest.json", "repositories", f"{image_id.removeprefix('sha256:')}.json"} <= set(names)
    mounts_before = Path("/proc/mounts").read_text()
    with ScratchDockerd(tmp_path / "docker") as dockerd:
        pid = dockerd.daemon_pid()
        assert "Loaded image: bb:1" in dockerd.docker("load", "-i", tmp_path / "bb-archive.tar").stdout
        assert dockerd.docker("images", "--no-trunc", "--format", "{{.ID}}", "bb:1").stdout.strip() == image_id
        run = dockerd.docker("run", "--rm", "--network=none", "bb:1", "sh", "-c", "echo ok; id -u")
        assert run.stdout == "ok\n0\n"
        info = dockerd.docker("info", "--format", "{{.Driver}} {{.DockerRootDir}}").stdout.split()
        assert info == ["overlay2", str(tmp_path / "docker/data-root")]
        assert (tmp_path / "docker/data-root/overlay2").is_dir()
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert Path("/proc/mounts").read_text().count("overlay") <= mounts_before.count("overlay")
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{dockerd.cgroup_parent}"))
    assert not dockerd.run.exists()


@needs_runtime
@needs_registry
@pytest.mark.root
@needs_root
def test_a_pushed_image_pulls_and_runs(tmp_path: Path) -> None:
    registry.busybox_layer(tmp_path / "bb.tar")
    registry.random_layer(tmp_path / "data.tar", 1 << 20, seed=3)
    with Registry(tmp_path / "registry") as reg, ScratchDockerd(tmp_path / "docker", host_network=True) as dockerd:
        digest = registry.push_image(reg, "tools/bb", "2", [tmp_path / "bb.tar", tmp_path / "data.tar"],
                                     {"Cmd": ["sh", "-c", "wc -c < /data/blob"]})  # fmt: skip
        pulled = dockerd.docker("pull", f"{reg.host}/tools/bb:2").stdout
        assert f"Digest: {digest}" in pulled
        assert dockerd.docker("run", "--rm", "--network=none", f"{reg.host}/tools/bb:2").stdout.strip() == "1048576"


@needs_runtime
@pytest.mark.root
@needs_root
def test_archive_imports_with_ctr(tmp_path: Path) -> None:
    registry.busybox_layer(tmp_path / "bb.tar")
    registry.docker_archive(tmp_path / "bb-archive.tar", "bb:1", [tmp_path / "bb.tar"])
    host_state = {path: Path(path).exists() for path in ("/run/containerd", "/sys/fs/cgroup/memory/k8s.io")}
    with ScratchContainerd(tmp_path / "containerd") as containerd:
        pid = containerd.daemon_pid()
        assert (
            "unpacking docker.io/library/bb:1"
            in containerd.ctr("-n", "k8s.io", "images", "import", tmp_path / "bb-archive.tar").stdout
        )
        assert "docker.io/library/bb:1" in containerd.ctr("-n", "k8s.io", "images", "ls", "-q").stdout.split()
        run = containerd.ctr("-n", "k8s.io", "run", "--rm", "docker.io/library/bb:1", "t1", "sh", "-c", "echo ok")
        assert run.stdout == "ok\n"
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert {path: Path(path).exists() for path in host_state} == host_state
    assert not containerd.run.exists()
