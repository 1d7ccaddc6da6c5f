"""The Cloud Build step image: the repository's Dockerfile, built and run here.

This machine cannot pull base images, so the Dockerfile is built against local stand-ins tagged with
the exact names of its FROM lines:

- debian:bookworm-slim: Debian 12 from `debootstrap --variant=minbase`, imported with `docker import`
  (the root file system is cached under ~/.cache/cos-customizer/step-image, keyed by its recipe);
- arm64v8/debian:bookworm-slim: the same for arm64 (`debootstrap --arch=arm64`, its second stage under
  qemu-user-static), imported as linux/arm64. The builder-arm64 stage runs under the same emulation:
  the build holds cos-customizer's own binfmt_misc registration (`binfmt.emulation`);
- gcr.io/compute-image-tools/daisy:latest: an image holding only /daisy, a shell script that prints a
  version. The real daisy (a static Go executable at the same path) cannot be pulled here, so only
  where it lands in the step image is checked, not daisy itself.

The daemon is a private dockerd (`tests.registry.ScratchDockerd`: no iptables rules, no bridge, no
IP forwarding) on this machine's network so that `docker build --network=host` reaches Debian's mirror
and PyPI; the test checks that the network links and the firewall rules are the same afterwards. Its
data root is kept under the same cache, so later runs reuse the layers that did not change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cos_customizer
from cos_customizer import binfmt, privilege, provisioner_build
from cos_customizer.arch import Arch
from cos_customizer.cache import home as cache_home
from cos_customizer.disk import gpt
from cos_customizer.sample import guest as sample_guest
from tests.integration.test_local_build import cat
from tests.registry import DOCKER, DOCKERD, ScratchDockerd

REPO = Path(__file__).resolve().parents[2]
DEBIAN = "debian:bookworm-slim"
DEBIAN_ARM64 = "arm64v8/debian:bookworm-slim"
DAISY = "gcr.io/compute-image-tools/daisy:latest"
IMAGE = "cos-customizer-step:test"
BUILDER = "cos-customizer-step:builder"
BUILDER_ARM64 = "cos-customizer-step:builder-arm64"
STANDIN_LABEL = "cos-customizer.standin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
RECIPE = "1"  # change it when the stand-in's recipe changes: the cached root file system is rebuilt
DAISY_STANDIN = b"#!/bin/sh\n# A stand-in for daisy: the real one cannot be pulled here.\necho 'daisy stand-in 0.0'\n"
TOOLS = ("mke2fs", "e2fsck", "resize2fs", "debugfs", "losetup", "mount", "umount", "unshare", "mcopy", "mtype",
         "mkfs.vfat", "qemu-img", "tar", "gzip", "pigz", "slirp4netns", "ldd")  # fmt: skip


def _why_not() -> str | None:
    if not privilege.can_mount():
        return "the step image test runs a private dockerd and debootstrap: it needs root"
    for path, package in ((DOCKERD, "docker.io"), (DOCKER, "docker.io"), ("/usr/sbin/debootstrap", "debootstrap"),
                          ("/usr/bin/unshare", "util-linux"), ("/usr/sbin/iptables-save", "iptables"),
                          (Arch.ARM64.qemu_user, "qemu-user-static")):  # fmt: skip
        if not Path(path).exists():
            return f"{path} is missing: apt-get install {package}"
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists() and not Path("/sys/fs/cgroup/memory").exists():
        return "no cgroup file system at /sys/fs/cgroup: dockerd cannot run containers"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def cache_dir() -> Path:
    path = cache_home() / "step-image"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One test run at a time uses the cache (a dockerd's data root takes one daemon)."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def host_ca_bundle() -> bytes:
    """This machine's CA bundle: it may reach PyPI through a proxy that only its own CAs vouch for."""
    with contextlib.suppress(OSError):
        return HOST_CA_BUNDLE.read_bytes()
    return b""


def debian_rootfs(cache: Path, arch: Arch = Arch.AMD64) -> tuple[Path, str]:
    """A tarball of Debian bookworm for `arch` from `debootstrap --variant=minbase`, and its recipe's key
    (cached; arm64's second stage runs under emulation, in a mount namespace of its own).

    With this machine's CA bundle as /etc/ssl/host-ca-certificates.crt and an /etc/pip.conf naming
    it, so that pip in the build trusts what pip here trusts (Debian's image has neither: behind such
    a proxy, any base image needs them).
    """
    mirror = sample_guest.apt_mirror()
    bundle = host_ca_bundle()
    recipe = f"{RECIPE} bookworm minbase {mirror} {hashlib.sha256(bundle).hexdigest()}"
    if arch is not Arch.AMD64:
        recipe += f" {arch.debian}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    prefix = "debian-bookworm-minbase-" if arch is Arch.AMD64 else f"debian-bookworm-minbase-{arch.debian}-"
    tarball = cache / f"{prefix}{key}.tar"
    if tarball.exists():
        return tarball, key
    others = tuple(f"debian-bookworm-minbase-{other.debian}-" for other in Arch if other is not Arch.AMD64)
    for stale in cache.glob(f"{prefix}*"):
        if arch is Arch.AMD64 and stale.name.startswith(others):
            continue  # another machine's
        sample_guest._remove_tree(stale) if stale.is_dir() else stale.unlink()
    root = cache / f"{prefix}{key}.partial"
    argv = ["debootstrap", "--variant=minbase", "bookworm", str(root), mirror]
    if arch is not Arch.AMD64:
        argv = ["unshare", "--mount", "--propagation=private", "--", argv[0], f"--arch={arch.debian}", *argv[1:]]
    try:
        with binfmt.emulation(arch):
            subprocess.run(argv, check=True, capture_output=True, text=True, timeout=1800)
    except subprocess.CalledProcessError as err:
        pytest.fail(f"debootstrap failed: {err.stdout[-2000:]}{err.stderr[-2000:]}")
    finally:
        sample_guest._unmount_all(root)
    if bundle:
        (root / "etc/ssl").mkdir(parents=True, exist_ok=True)
        (root / "etc/ssl/host-ca-certificates.crt").write_bytes(bundle)
        (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/host-ca-certificates.crt\n")
    # As Debian's own images: no package lists or downloaded packages.
    for pattern in ("var/lib/apt/lists/*_*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb"):
        for path in root.glob(pattern):
            path.unlink()
    partial = tarball.with_suffix(".tar.partial")
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "--xattrs", "-cf", str(partial), "."], check=True)
    partial.rename(tarball)
    shutil.rmtree(root)
    return tarball, key


def daisy_tarball(path: Path) -> str:
    """A root file system holding only /daisy (the stand-in script); returns its key."""
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("daisy")
        info.size, info.mode = len(DAISY_STANDIN), 0o755
        tar.addfile(info, io.BytesIO(DAISY_STANDIN))
    return hashlib.sha256(DAISY_STANDIN).hexdigest()[:16]


def import_standin(dockerd: ScratchDockerd, tarball: Path, name: str, key: str, *changes: str) -> None:
    """`docker import` `tarball` as `name` unless the image of that name is this very stand-in (its label)."""
    inspect = dockerd.docker("image", "inspect", "-f", f'{{{{index .Config.Labels "{STANDIN_LABEL}"}}}}', name,
                             check=False)  # fmt: skip
    if inspect.returncode == 0 and inspect.stdout.strip() == key:
        return
    dockerd.docker("import", "--change", f"LABEL {STANDIN_LABEL}={key}", *changes, tarball, name)


def from_lines() -> list[str]:
    return re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)


def network_state() -> dict[str, str]:
    """This machine's links and firewall rules (iptables-save without its dated comments)."""
    state = {"links": subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout}
    for tool in ("iptables-save", "ip6tables-save"):
        out = subprocess.run([tool], capture_output=True, text=True, check=False).stdout
        state[tool] = "\n".join(line for line in out.splitlines() if not line.startswith("#"))
    return state


@contextlib.contextmanager
def scratch_dockerd(tmp: Path, data_root: Path) -> Iterator[ScratchDockerd]:
    """A private dockerd on this machine's network with the cached `data_root`; a data root it cannot
    start with (a run killed mid-way) is emptied and it starts again, with nothing cached."""
    with contextlib.ExitStack() as stack:
        try:
            dockerd = stack.enter_context(ScratchDockerd(tmp / "dockerd", data_root=data_root, host_network=True))
        except RuntimeError:
            shutil.rmtree(data_root)
            dockerd = stack.enter_context(ScratchDockerd(tmp / "dockerd-again", data_root=data_root, host_network=True))
        yield dockerd


@pytest.fixture(scope="module")
def step_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ScratchDockerd, dict[str, float]]]:
    """The step image built from the repository's Dockerfile, and the dockerd holding it."""
    tmp = tmp_path_factory.mktemp("step-image")
    cache = cache_dir()
    before = network_state()
    times: dict[str, float] = {}
    with locked(cache / ".lock"):
        started = time.monotonic()
        rootfs, key = debian_rootfs(cache)
        rootfs_arm64, key_arm64 = debian_rootfs(cache, Arch.ARM64)
        times["rootfs"] = time.monotonic() - started
        with scratch_dockerd(tmp, cache / "docker") as dockerd, binfmt.emulation(Arch.ARM64):
            try:
                import_standin(dockerd, rootfs, DEBIAN, key)
                import_standin(dockerd, rootfs_arm64, DEBIAN_ARM64, key_arm64, "--platform", "linux/arm64")
                daisy_key = daisy_tarball(tmp / "daisy.tar")
                import_standin(dockerd, tmp / "daisy.tar", DAISY, daisy_key, "--change", 'ENTRYPOINT ["/daisy"]')
                started = time.monotonic()
                # As deploy/cloudbuild.yaml builds it: the image is told its own name (an SBOM's tool).
                build = dockerd.docker("build", "--network=host", "--force-rm", f"--build-arg=STEP_IMAGE={IMAGE}",
                                       "-t", IMAGE, REPO, check=False, timeout=3000)  # fmt: skip
                times["build"] = time.monotonic() - started
                assert build.returncode == 0, f"docker build failed:\n{build.stdout[-6000:]}\n{build.stderr[-3000:]}"
                # The builder stages tagged too (all from the cache now), so the prune below keeps their layers.
                for stage, tag in (("builder", BUILDER), ("builder-arm64", BUILDER_ARM64)):
                    dockerd.docker("build", "--network=host", f"--target={stage}", "-t", tag, REPO, timeout=600)
                yield dockerd, times
            finally:
                # Only what this build left unreferenced goes: the image and the layers it shares stay cached.
                dockerd.docker("image", "prune", "-f", check=False)
    assert network_state() == before


def run(dockerd: ScratchDockerd, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`docker run` of the step image with no network; `args` are docker's options, then the image's."""
    return dockerd.docker("run", "--rm", "--network=none", *args, check=check, timeout=300)


def test_the_dockerfile_names_the_stand_ins() -> None:
    assert from_lines() == [DAISY, DEBIAN, "base", DEBIAN_ARM64, "base"]
    assert (
        "\nFROM --platform=linux/arm64 arm64v8/debian:bookworm-slim AS builder-arm64\n"
        in (REPO / "Dockerfile").read_text()
    )
    assert '\nENTRYPOINT ["cos-customizer"]\n' in (REPO / "Dockerfile").read_text()
    assert "COPY --from=daisy /daisy /usr/local/bin/daisy\n" in (REPO / "Dockerfile").read_text()


def test_help_and_version(step_image: tuple[ScratchDockerd, dict[str, float]]) -> None:
    dockerd, times = step_image
    print(f"step image: rootfs {times['rootfs']:.1f} s, docker build {times['build']:.1f} s")
    result = run(dockerd, IMAGE, "--help")
    for step in ("start-image-build", "run-script", "seal-oem", "finish-image-build", "sample-image"):
        assert f"  {step} " in result.stdout
    assert run(dockerd, IMAGE, "-version").stdout == f"cos-customizer {cos_customizer.__version__}\n"
    config = json.loads(dockerd.docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["cos-customizer"]
    assert config["WorkingDir"] == "/workspace"
    assert f"COS_CUSTOMIZER_STEP_IMAGE={IMAGE}" in config["Env"]  # an SBOM made inside names this image


def test_sample_image_inside(step_image: tuple[ScratchDockerd, dict[str, float]], sample_raw: Path,
                             tmp_path: Path) -> None:  # fmt: skip
    dockerd, _ = step_image
    out = tmp_path / "out"
    out.mkdir()
    result = run(dockerd, "-v", f"{out}:/out", IMAGE, "sample-image", "/out/x.img")
    assert "/out/x.img" in result.stderr
    made, ours = gpt.read_table(out / "x.img"), gpt.read_table(sample_raw)
    assert [(p.number, p.name, p.first, p.last) for p in made.partitions] == [
        (p.number, p.name, p.first, p.last) for p in ours.partitions
    ]


def test_daisy_and_the_tools_are_on_path(step_image: tuple[ScratchDockerd, dict[str, float]]) -> None:
    dockerd, _ = step_image
    found = run(dockerd, "--entrypoint", "sh", IMAGE, "-c", "command -v daisy && daisy")
    assert found.stdout == "/usr/local/bin/daisy\ndaisy stand-in 0.0\n"
    script = 'for t in "$@"; do command -v "$t" >/dev/null || { echo "missing $t"; exit 1; }; done'
    result = run(dockerd, "--entrypoint", "sh", IMAGE, "-c", script, "sh", *TOOLS, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_prebuilt_provisioner_matches_these_sources(step_image: tuple[ScratchDockerd, dict[str, float]],
                                                      tmp_path: Path) -> None:  # fmt: skip
    dockerd, _ = step_image
    out = tmp_path / "out"
    out.mkdir()
    manifest = json.loads(run(dockerd, "--entrypoint", "cat", IMAGE, "/usr/lib/cos-customizer/provisioner.json").stdout)
    # Built from this checkout: the image's manifest names this package's version and sources.
    assert manifest["cos_customizer"] == cos_customizer.__version__
    assert manifest["sources"] == provisioner_build.package_digest()
    result = run(dockerd, "-v", f"{out}:/out", IMAGE, "build-provisioner", "-output=/out/p")
    assert "prebuilt /usr/lib/cos-customizer/provisioner)" in result.stderr
    assert hashlib.sha256((out / "p").read_bytes()).hexdigest() == manifest["sha256"]
    help_text = run(dockerd, "--entrypoint", "/usr/lib/cos-customizer/provisioner", IMAGE, "--help").stdout
    for command in ("run", "resume", "handle-disk-layout", "wait-metadata"):
        assert command in help_text


def test_the_prebuilt_arm64_provisioner_matches_these_sources(step_image: tuple[ScratchDockerd, dict[str, float]],
                                                            tmp_path: Path) -> None:  # fmt: skip
    """The arm64 one beside it: its manifest names arm64 and these sources, `file` calls it a static aarch64
    executable, and it runs (under the emulation the fixture holds)."""
    dockerd, _ = step_image
    out = tmp_path / "out"
    out.mkdir()
    text = run(dockerd, "--entrypoint", "cat", IMAGE, "/usr/lib/cos-customizer/provisioner-arm64.json").stdout
    manifest = json.loads(text)
    assert manifest["arch"] == "arm64"
    assert manifest["cos_customizer"] == cos_customizer.__version__
    assert manifest["sources"] == provisioner_build.package_digest()
    result = run(dockerd, "-v", f"{out}:/out", IMAGE, "build-provisioner", "-arch=arm64", "-output=/out/p")
    assert "prebuilt /usr/lib/cos-customizer/provisioner-arm64)" in result.stderr
    assert hashlib.sha256((out / "p").read_bytes()).hexdigest() == manifest["sha256"]
    described = subprocess.run(["file", "-b", str(out / "p")], capture_output=True, text=True, check=True).stdout
    assert "ARM aarch64" in described and "statically linked" in described, described
    help_text = run(dockerd, "--entrypoint", "/usr/lib/cos-customizer/provisioner-arm64", IMAGE, "--help").stdout
    for command in ("run", "resume", "handle-disk-layout", "wait-metadata"):
        assert command in help_text


def test_a_file_that_is_not_the_provisioner_is_refused_inside(
    step_image: tuple[ScratchDockerd, dict[str, float]],
) -> None:
    dockerd, _ = step_image
    result = run(dockerd, "-e", "COS_CUSTOMIZER_PROVISIONER=/usr/local/bin/daisy", IMAGE, "build-provisioner",
                 "-output=/tmp/p", check=False)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "cos-customizer: error: the prebuilt provisioner /usr/local/bin/daisy ($COS_CUSTOMIZER_PROVISIONER) "
        "is not an x86-64 ELF executable\n"
    )


def test_a_local_build_inside(step_image: tuple[ScratchDockerd, dict[str, float]], tmp_path: Path) -> None:
    """The GitHub Actions example's build, run in the image: its tools suffice for a local build.

    A local build needs loop devices and mounts: `--privileged -v /dev:/dev` on a usual docker host.
    This machine's capability bounding set lacks CAP_SYS_RESOURCE, which --privileged asks for, so the
    same is spelled out here: every other capability, no seccomp or AppArmor profile, every device.
    """
    dockerd, _ = step_image
    work = tmp_path / "work"
    shutil.copytree(REPO / "examples/github-actions", work / "ctx")
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    options = ["--cap-add=ALL", "--cap-drop=SYS_RESOURCE", "--security-opt", "seccomp=unconfined",
               "--security-opt", "apparmor=unconfined", "--device-cgroup-rule=b *:* rwm",
               "--device-cgroup-rule=c *:* rwm", "-v", "/dev:/dev", "-v", f"{work}:/workspace",
               "-e", "COS_CUSTOMIZER_WORKDIR=/workspace/ws", IMAGE]  # fmt: skip
    for argv in (["sample-image", "cos.raw"], ["start-image-build", "-build-context=ctx", "-image-file=cos.raw"],
                 ["run-script", "-script=hello.sh"], ["seal-oem"], ["disable-auto-update"],
                 ["finish-image-build", "-oem-size=1G", "-disk-size-gb=12", "-output=custom.tar.gz"]):  # fmt: skip
        result = run(dockerd, *options, *argv, check=False)
        assert result.returncode == 0, f"{argv}: {result.stderr[-3000:]}"
    assert subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout == loops
    subprocess.run(["tar", "-xzf", str(work / "custom.tar.gz"), "-C", str(tmp_path)], check=True)
    table = gpt.read_table(tmp_path / "disk.raw")
    assert table.disk_sectors * 512 == 12 << 30
    assert cat(tmp_path / "disk.raw", table.partition(1).first * 512, "/var_overlay/lib/hello") == "Hello, World!\n"
