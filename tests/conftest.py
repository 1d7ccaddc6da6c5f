"""Fixtures and helpers shared by every test tier, and CI's rule on skipped tests (`ALLOWED_SKIPS`)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cos_customizer.cli.main import main
from cos_customizer.disk import mover
from cos_customizer.sample import image as sample_image
from tests.compute_standin import Compute, serve

# Under CI=true a skipped test is a failure, unless it is listed here with the reason this machine cannot run it
# (a kernel feature it lacks). The key is the test's node id, as `pytest -rs` prints it.
ALLOWED_SKIPS: dict[str, str] = {
    "tests/integration/test_blockdev.py::test_drop_cache_makes_the_disk_see_what_the_partition_wrote":
        "the CI machine's kernel has no device-mapper (dmsetup version fails)",
    "tests/integration/test_grub.py::test_seal_without_a_verity_line_fails_first_and_changes_nothing[mount]":
        "the CI machine's kernel has no vfat file system (not in /proc/filesystems)",
}  # fmt: skip


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_unlisted_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI=true, turn `report`'s skip into a failure unless its test is in ALLOWED_SKIPS."""
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    if report.nodeid in ALLOWED_SKIPS:
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true ({_skip_reason(report)}): in CI a skip is a failure. Make the test run here, or, "
        f"if this machine cannot run it (a kernel feature it lacks), add {report.nodeid!r} with that reason to "
        "ALLOWED_SKIPS in tests/conftest.py"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    _fail_unlisted_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report: pytest.CollectReport = yield
    _fail_unlisted_skip(report)  # a whole module skipped (`pytest.skip(..., allow_module_level=True)`)
    return report


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


CLI = Callable[..., Result]


def read_until(stream: Iterable[str], marker: str, what: str) -> list[str]:
    """Read lines from a running command's `stream` until one contains `marker`; fail with `what` if it ends first."""
    seen: list[str] = []
    for line in stream:
        seen.append(line)
        if marker in line:
            return seen
    pytest.fail(f"{what}: " + "".join(seen))


def sh(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a stock tool (an oracle or a fixture step), text in and out."""
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check)


def sigint_as_from_a_terminal() -> None:
    """A `preexec_fn` for a child the test interrupts with SIGINT: its default action, as a command typed at a
    terminal has it. Started from a shell's background job (`scripts/test --all &`), the tests inherit SIGINT
    ignored, and so would the child: ignored at its start, Python never turns SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def workspace_root(tmp_path: Path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def compute() -> Iterator[Compute]:
    """A loopback Compute Engine stand-in with a few cos-cloud images."""
    state, server = serve()
    state.add_image("cos-cloud", "cos-stable-109-17800-66-0", family="cos-stable", created="2024-05-01T00:00:00Z",
                    labels={"milestone": "109"})  # fmt: skip
    state.add_image("cos-cloud", "cos-109-17800-0-0", created="2024-04-01T00:00:00Z")
    state.add_image("cos-cloud", "cos-stable-113-18244-1-0", family="cos-stable", created="2024-01-01T00:00:00Z",
                    deprecated=True)  # fmt: skip
    yield state
    server.shutdown()


@pytest.fixture
def cli(home: Path, workspace_root: Path, capsys: pytest.CaptureFixture[str], compute: Compute) -> CLI:
    """Run the command line in-process with an isolated HOME, workspace, and a Compute stand-in."""

    def run(*argv: str, env: dict[str, str] | None = None) -> Result:
        environ = {"HOME": str(home), "COS_CUSTOMIZER_WORKDIR": str(workspace_root), "PATH": os.environ["PATH"],
                   "COS_CUSTOMIZER_COMPUTE_ENDPOINT": f"{compute.url}/compute/v1/"}  # fmt: skip
        environ.update(env or {})
        capsys.readouterr()
        code = main(list(argv), environ)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def context_dir(tmp_path: Path) -> Path:
    """A build context with a script, a library and an executable."""
    path = tmp_path / "context"
    (path / "lib").mkdir(parents=True)
    (path / "preload.sh").write_text("echo hello > /var/lib/hello\n")
    (path / "lib" / "mylib.sh").write_text("greet() { echo hi; }\n")
    tool = path / "tool.sh"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (path / "pkgspec").mkdir()
    (path / "pkgspec" / "k8s.yaml").write_text("packages: []\n")
    return path


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sample COS image for the whole session; tests must not write it."""
    path = tmp_path_factory.mktemp("sample") / "cos.raw"
    sample_image.build(path)
    return path


@pytest.fixture(scope="session")
def containers_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample image with this machine's docker.io and containerd (`sample-image -with-containers`)."""
    path = tmp_path_factory.mktemp("sample-containers") / "cos.raw"
    sample_image.build(path, with_containers=True)
    return path


@pytest.fixture(scope="session")
def sample_raw_dm_mod(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sample COS image whose grub.cfg uses the upstream `dm-mod.create=` form; tests must not write it."""
    path = tmp_path_factory.mktemp("sample-dm-mod") / "cos.raw"
    sample_image.build(path, grub_format="dm-mod")
    return path


# The sample image fixture for each -grub-format value: parametrize a test over these and take the fixture
# with request.getfixturevalue(SAMPLE_FIXTURES[grub_format]).
SAMPLE_FIXTURES = {"dm": "sample_raw", "dm-mod": "sample_raw_dm_mod"}


@pytest.fixture
def image_file(sample_raw: Path) -> Path:
    return sample_raw


@pytest.fixture
def local_build(cli: CLI, context_dir: Path, image_file: Path) -> CLI:
    """A started local build; returns the cli runner."""
    result = cli("start-image-build", f"-build-context={context_dir}", f"-image-file={image_file}")
    assert result.code == 0, result.err
    return cli


@pytest.fixture
def gce_build(cli: CLI, context_dir: Path) -> CLI:
    result = cli(
        "start-image-build",
        f"-build-context={context_dir}",
        "-image-project=cos-cloud",
        "-image-name=cos-stable-109-17800-66-0",
        "-gcs-bucket=bucket",
        "-gcs-workdir=build-1",
    )
    assert result.code == 0, result.err
    return cli


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: to show that nothing changed."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


MiB = 1 << 20


def data_digest(path: Path) -> str:
    """A digest of the file's size and bytes, reading only around data extents (cheap on sparse images).

    Canonical: 1 MiB blocks that hold data are hashed with their offset, all-zero ones skipped, so
    the digest does not depend on how the file system happens to split its extents.
    """
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = sorted(
            {block for offset, length in mover.data_extents(fd, 0, path.stat().st_size)
             for block in range(offset // MiB, -(-(offset + length) // MiB))}
        )  # fmt: skip
        for block in blocks:
            data = os.pread(fd, MiB, block * MiB)
            if data.count(0) != len(data):
                digest.update(block.to_bytes(8, "little") + data)
    finally:
        os.close(fd)
    return digest.hexdigest()


# NVIDIA's public driver bucket as install-gpu reads it (gs://nvidia-drivers-us-public/tesla/<version>/...).
DRIVER_OBJECTS = (
    "tesla/535.104.05/NVIDIA-Linux-x86_64-535.104.05.run",
    "tesla/450.51.06/NVIDIA-Linux-x86_64-450.51.06.run",
    "tesla/450.51.06/NVIDIA-Linux-x86_64-450.51.06.run.md5",
)


@pytest.fixture(scope="session")
def driver_bucket_host() -> Iterator[str]:
    """A GCS emulator holding NVIDIA's public driver bucket, for the whole session."""
    import socket
    import threading

    from gcp_storage_emulator.server import create_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="nvidia-drivers-us-public")
    threading.Thread(target=server.start, daemon=True).start()
    host = f"http://127.0.0.1:{port}"
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage  # type: ignore[attr-defined]

    client = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": host})  # type: ignore[no-untyped-call]
    for name in DRIVER_OBJECTS:
        client.bucket("nvidia-drivers-us-public").blob(name).upload_from_string("x")
    yield host
    server.stop()


@pytest.fixture
def driver_bucket(driver_bucket_host: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", driver_bucket_host)
    return driver_bucket_host
