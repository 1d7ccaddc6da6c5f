"""A prebuilt provisioner (the step image's): chosen by $COS_CUSTOMIZER_PROVISIONER or the fixed path,
used only when its manifest names this package's version and sources and the file's own sha256, and
checked by reading it, never by running it. What a build ships is the copy it checked, never the file
as a path names it later; files other users could change, FIFOs and oversized manifests are refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

import cos_customizer
from cos_customizer import provisioner_build
from cos_customizer.arch import Arch
from cos_customizer.errors import CustomizerError, ValidationError
from cos_customizer.executors import disks
from tests.conftest import CLI
from tests.unit.test_gce_build import BUCKET, daisy, gcs, managed  # noqa: F401 (fixtures)

ENV = provisioner_build.PREBUILT_ENV


def elf(machine: int = 62, body: bytes = b"") -> bytes:
    """The start of a 64-bit little-endian ELF file for `machine` (62 x86-64, 183 arm64)."""
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    header[16:18] = (2).to_bytes(2, "little")  # ET_EXEC
    header[18:20] = machine.to_bytes(2, "little")
    return bytes(header) + body


def make_prebuilt(directory: Path, content: bytes | None = None, **changes: Any) -> Path:
    """An executable with the manifest this package writes for it, with `changes` to the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "provisioner"
    binary.write_bytes(elf(body=b"prebuilt provisioner stand-in") if content is None else content)
    binary.chmod(0o755)
    document = {**provisioner_build.manifest(binary), **changes}
    provisioner_build.manifest_path(binary).write_text(json.dumps(document))
    return binary


def refused(environ: dict[str, str], default: Path | None = None) -> str:
    with pytest.raises(ValidationError) as caught:
        provisioner_build.prebuilt(environ, default) if default else provisioner_build.prebuilt(environ)
    message = str(caught.value)
    assert "\n" not in message  # one line
    return message


def test_none_when_nothing_is_named_and_the_default_is_absent(tmp_path: Path) -> None:
    assert provisioner_build.prebuilt({}, tmp_path / "absent") is None
    assert provisioner_build.prebuilt({ENV: ""}, tmp_path / "absent") is None  # empty is unset


def test_a_matching_prebuilt_is_used_from_the_variable_or_the_default(tmp_path: Path) -> None:
    named = make_prebuilt(tmp_path / "named")
    default = make_prebuilt(tmp_path / "default")
    assert provisioner_build.prebuilt({ENV: str(named)}, default) == named  # the variable first
    assert provisioner_build.prebuilt({}, default) == default
    relative = os.path.relpath(named)
    assert provisioner_build.prebuilt({ENV: relative}, tmp_path / "absent") == named


def test_the_manifest_names_version_sources_and_the_files_sha256(tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path)
    document = json.loads((tmp_path / "provisioner.json").read_text())
    assert document == {
        "cos_customizer": cos_customizer.__version__,
        "sources": provisioner_build.package_digest(),
        "sha256": hashlib.sha256(binary.read_bytes()).hexdigest(),
        "arch": "x86-64",
    }
    # The sources digest is the package's .py files alone: the cache key adds the tools to it.
    assert provisioner_build.package_digest() != provisioner_build.source_digest()


def test_a_named_file_that_is_not_there_is_refused(tmp_path: Path) -> None:
    message = refused({ENV: str(tmp_path / "nope")})
    assert message == f"the prebuilt provisioner {tmp_path / 'nope'} (${ENV}) cannot be read: No such file or directory"


def test_stale_sources_are_refused(tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path, sources="0123456789abcdef0123456789abcdef")
    message = refused({ENV: str(binary)})
    mine = provisioner_build.package_digest()[:12]
    assert message == (
        f"the prebuilt provisioner {binary} (${ENV}) is stale: built from cos-customizer {cos_customizer.__version__} "
        f"(sources 0123456789ab), this is {cos_customizer.__version__} (sources {mine}): rebuild it with "
        "python -m cos_customizer.provisioner_build DIR (or rebuild the step image)"
    )


def test_another_version_is_refused(tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path / "d", cos_customizer="0.0.9")
    assert "is stale: built from cos-customizer 0.0.9 " in refused({}, binary)
    assert "(the prebuilt default)" in refused({}, binary)


def test_a_file_other_than_the_manifests_is_refused(tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path)
    binary.write_bytes(elf(body=b"another provisioner"))
    assert refused({ENV: str(binary)}) == (
        f"the prebuilt provisioner {binary} (${ENV}) is not the file its manifest "
        f"{tmp_path / 'provisioner.json'} describes (sha256 differs)"
    )


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (None, "has no readable manifest"),
        ("{not json", "is not JSON"),
        ("[]", "lacks cos_customizer, sources or sha256"),
        ('{"cos_customizer": "0.1.0", "sources": 7, "sha256": "x"}', "lacks cos_customizer, sources or sha256"),
    ],
)
def test_a_missing_or_broken_manifest_is_refused(tmp_path: Path, manifest: str | None, expected: str) -> None:
    binary = make_prebuilt(tmp_path)
    path = tmp_path / "provisioner.json"
    if manifest is None:
        path.unlink()
    else:
        path.write_text(manifest)
    assert expected in refused({ENV: str(binary)})


def test_it_is_never_run_to_be_checked(tmp_path: Path) -> None:
    """A script that would leave a mark if run: refused as not an ELF, and never started."""
    mark = tmp_path / "ran"
    binary = make_prebuilt(tmp_path / "d", content=f"#!/bin/sh\ntouch {mark}\n".encode())
    assert refused({ENV: str(binary)}).endswith("is not an x86-64 ELF executable")
    assert not mark.exists()


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [
        (elf(183), 0o755, "is not an x86-64 ELF executable"),  # an arm64 build
        (elf()[:10], 0o755, "is not an x86-64 ELF executable"),
        (elf(), 0o644, "is not an executable file"),
    ],
)
def test_not_an_x86_64_executable_is_refused(tmp_path: Path, content: bytes, mode: int, expected: str) -> None:
    binary = make_prebuilt(tmp_path, content=content)
    binary.chmod(mode)
    assert refused({ENV: str(binary)}).endswith(expected)


def test_a_directory_or_an_oversized_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    assert refused({ENV: str(tmp_path / "dir")}).endswith("is not an executable file")
    big = make_prebuilt(tmp_path / "big")
    with open(big, "r+b") as f:
        f.truncate(provisioner_build.MAX_SIZE + 1)
    assert refused({ENV: str(big)}).endswith("is over the 40 MiB limit")


def test_a_stale_default_is_refused_not_skipped(tmp_path: Path) -> None:
    """A stale file at the fixed path stops the build: it is never silently replaced by another one."""
    default = make_prebuilt(tmp_path, sources="f" * 32)
    assert "(the prebuilt default) is stale" in refused({}, default)


def test_build_provisioner_copies_a_matching_prebuilt(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = make_prebuilt(tmp_path / "prebuilt")

    def no_build(*_: object) -> None:
        raise AssertionError("built although a prebuilt provisioner was given")

    monkeypatch.setattr(provisioner_build, "build", no_build)
    output = tmp_path / "out"
    result = cli("build-provisioner", f"-output={output}", env={ENV: str(binary)})
    assert result.code == 0, result.err
    assert f"prebuilt {binary})" in result.err
    assert output.read_bytes() == binary.read_bytes()
    assert os.access(output, os.X_OK)


def test_build_provisioner_refuses_a_stale_prebuilt_with_one_line(cli: CLI, tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path / "prebuilt", sources="a" * 32)
    output = tmp_path / "out"
    result = cli("build-provisioner", f"-output={output}", env={ENV: str(binary)})
    assert result.code == 1
    assert result.err.count("\n") == 1
    assert result.err.startswith(f"cos-customizer: error: the prebuilt provisioner {binary} (${ENV}) is stale")
    assert not output.exists()


def test_module_main_usage() -> None:
    assert provisioner_build.main([]) == 2
    assert provisioner_build.main(["-h"]) == 2


def gce_steps(cli: CLI, context_dir: Path) -> None:
    result = cli("start-image-build", f"-build-context={context_dir}", "-image-project=cos-cloud",
                 "-image-family=cos-stable", f"-gcs-bucket={BUCKET}", "-gcs-workdir=build-7")  # fmt: skip
    assert result.code == 0, result.err
    assert cli("seal-oem").code == 0


def gce_finish(cli: CLI, daisy: tuple[Path, Path], **env: str) -> Any:  # noqa: F811 (the fixture's value)
    environ = {"COS_CUSTOMIZER_DAISY": str(daisy[0]), "DAISY_STANDIN_RECORD": str(daisy[1]),
               "DAISY_STANDIN_INSPECT": "1", "STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"], **env}  # fmt: skip
    return cli("finish-image-build", "-zone=us-west1-b", "-project=my-proj", "-image-project=my-proj",
               "-image-name=custom-1", "-oem-size=1G", "-disk-size-gb=13", env=environ)  # fmt: skip


def test_a_gce_build_puts_the_prebuilt_on_cidata(
    cli: CLI,
    context_dir: Path,
    gcs: Any,  # noqa: F811
    daisy: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    binary = make_prebuilt(tmp_path / "prebuilt")
    monkeypatch.setattr(provisioner_build, "build", lambda *_: pytest.fail("built although a prebuilt was given"))
    gce_steps(cli, context_dir)
    result = gce_finish(cli, daisy, **{ENV: str(binary)})
    assert result.code == 0, result.err
    record = json.loads(daisy[1].read_text())
    assert record["problems"] == []
    assert record["inspected"]["cidata_provisioner_sha256"] == hashlib.sha256(binary.read_bytes()).hexdigest()


def test_a_gce_build_refuses_a_stale_prebuilt_before_anything(
    cli: CLI,
    context_dir: Path,
    gcs: Any,  # noqa: F811
    daisy: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    workspace_root: Path,
) -> None:
    binary = make_prebuilt(tmp_path / "prebuilt")
    binary.write_bytes(elf(body=b"a newer build, the manifest left behind"))
    gce_steps(cli, context_dir)
    result = gce_finish(cli, daisy, **{ENV: str(binary)})
    assert result.code == 1
    assert result.err.endswith("describes (sha256 differs)\n")
    assert not daisy[1].exists()  # daisy never ran
    assert managed(gcs) == []  # nothing uploaded
    assert workspace_root.exists()  # the build can be finished again


def test_the_dry_run_names_the_prebuilt_and_refuses_a_stale_one(cli: CLI, context_dir: Path, tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path / "prebuilt")
    gce_steps(cli, context_dir)
    flags = ("-zone=us-west1-b", "-project=my-proj", "-image-project=my-proj", "-image-name=custom-1", "-dry-run")
    result = cli("finish-image-build", *flags, env={ENV: str(binary)})
    assert result.code == 0, result.err
    assert f"  CIDATA:    {binary} (prebuilt for this cos-customizer, checked against its manifest)\n" in result.err
    binary.write_bytes(elf(body=b"changed after its manifest was written"))
    result = cli("finish-image-build", *flags, env={ENV: str(binary)})
    assert result.code == 1
    assert result.err.endswith("describes (sha256 differs)\n")


# --- What is shipped is what was checked (issue 20, point 10) ---

ORIGINAL = elf(body=b"the provisioner the manifest describes")
SWAPPED = elf(body=b"a provisioner swapped in after the check")


def cidata_provisioner(archive: Path, tmp: Path) -> bytes:
    """The provisioner on a CIDATA disk (`.tar.gz` of disk.raw), read back with tar and mtools."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("disk.raw")
        assert member is not None
        (tmp / "disk.raw").write_bytes(member.read())
    copied = tmp / "provisioner-from-cidata"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mcopy", "-n", "-i", str(tmp / "disk.raw"), "::/provisioner", str(copied)], env=env, check=True)
    return copied.read_bytes()


def swap_when_cidata_is_made(
    monkeypatch: pytest.MonkeyPatch, named: Path, tmp_path: Path, stop: bool = False
) -> list[bytes]:
    """Replace `named` (rename over it, its manifest left as it was) once every check is done, just before
    the CIDATA disk is made; returns the provisioner bytes CIDATA then got. `stop` ends the build there."""
    shipped: list[bytes] = []
    real = disks.cidata_disk

    def swapping(work: Path, binary: Path, config: Any) -> Path:
        replacement = named.with_name("replacement")
        replacement.write_bytes(SWAPPED)
        replacement.chmod(0o755)
        replacement.replace(named)
        archive = real(work, binary, config)
        unpacked = tmp_path / f"cidata-{len(shipped)}"
        unpacked.mkdir()
        shipped.append(cidata_provisioner(archive, unpacked))
        if stop:
            raise CustomizerError("stopped by the test once CIDATA was made")
        return archive

    monkeypatch.setattr(disks, "cidata_disk", swapping)
    return shipped


@pytest.mark.parametrize("given", ["prebuilt", "provisioner-binary"])
def test_a_gce_build_ships_the_bytes_it_checked_not_a_file_swapped_after(
    cli: CLI,
    context_dir: Path,
    gcs: Any,  # noqa: F811
    daisy: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    given: str,
) -> None:
    binary = make_prebuilt(tmp_path / "prebuilt", content=ORIGINAL)
    shipped = swap_when_cidata_is_made(monkeypatch, binary, tmp_path)
    gce_steps(cli, context_dir)
    if given == "prebuilt":
        result = gce_finish(cli, daisy, **{ENV: str(binary)})
    else:
        environ = {"COS_CUSTOMIZER_DAISY": str(daisy[0]), "DAISY_STANDIN_RECORD": str(daisy[1]),
                   "DAISY_STANDIN_INSPECT": "1", "STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}  # fmt: skip
        result = cli("finish-image-build", "-zone=us-west1-b", "-project=my-proj", "-image-project=my-proj",
                     "-image-name=custom-1", "-oem-size=1G", "-disk-size-gb=13", f"-provisioner-binary={binary}",
                     env=environ)  # fmt: skip
    assert result.code == 0, result.err
    assert binary.read_bytes() == SWAPPED  # the swap happened
    assert shipped == [ORIGINAL]
    record = json.loads(daisy[1].read_text())
    assert record["inspected"]["cidata_provisioner_sha256"] == hashlib.sha256(ORIGINAL).hexdigest()


def test_a_rehearsal_ships_the_bytes_it_checked_not_a_file_swapped_after(
    local_build: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = make_prebuilt(tmp_path / "prebuilt", content=ORIGINAL)
    shipped = swap_when_cidata_is_made(monkeypatch, binary, tmp_path, stop=True)
    output = tmp_path / "out.raw"
    result = local_build("finish-image-build", "-executor=qemu", f"-output={output}", env={ENV: str(binary)})
    assert result.err.endswith("error: stopped by the test once CIDATA was made\n"), result.err
    assert binary.read_bytes() == SWAPPED
    assert shipped == [ORIGINAL]
    assert not output.exists()


def refused_at(binary: Path) -> str:
    return refused({ENV: str(binary)})


def test_a_file_or_directory_other_users_could_change_is_refused(tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path / "open" / "dir")
    manifest = provisioner_build.manifest_path(binary)
    where = f"the prebuilt provisioner {binary} (${ENV})"
    keep = "keep it in directories only root or you can write"

    binary.chmod(0o757)
    assert refused_at(binary) == f"{where} is writable by every user, so anyone could change it: chmod o-w it"
    binary.chmod(0o755)
    os.chown(binary, 4321, 0)
    assert refused_at(binary) == f"{where} belongs to uid 4321, who could change it: use a copy owned by root or you"
    os.chown(binary, os.geteuid(), 0)
    manifest.chmod(0o646)
    assert refused_at(binary) == (
        f"the prebuilt provisioner's manifest {manifest} is writable by every user, so anyone could change it: "
        "chmod o-w it"
    )
    manifest.chmod(0o644)
    assert provisioner_build.prebuilt({ENV: str(binary)}) == binary  # as it was made: accepted

    (tmp_path / "open").chmod(0o777)  # every user can rename "dir" in it
    assert (
        refused_at(binary)
        == f"{where} is in {tmp_path / 'open'}, which every user can write, so anyone could swap the file: {keep}"
    )
    (tmp_path / "open").chmod(0o755)
    os.chown(binary.parent, 4321, 0)
    assert (
        refused_at(binary)
        == f"{where} is in {binary.parent}, which belongs to uid 4321, who could swap the file: {keep}"
    )
    os.chown(binary.parent, os.geteuid(), 0)

    # A sticky directory (/tmp): others cannot rename what is not theirs; the entries on the path are ours.
    (tmp_path / "open").chmod(0o1777)
    assert provisioner_build.prebuilt({ENV: str(binary)}) == binary
    os.chown(binary.parent, 4321, 0)  # but an entry of another user's in it is theirs to swap
    assert (
        refused_at(binary)
        == f"{where} is in {binary.parent}, which belongs to uid 4321, who could swap the file: {keep}"
    )


def test_a_provisioner_binary_other_users_could_change_is_refused_by_the_dry_run_and_the_build(
    cli: CLI, context_dir: Path, tmp_path: Path
) -> None:
    binary = make_prebuilt(tmp_path / "mine")
    binary.chmod(0o646)
    gce_steps(cli, context_dir)
    flags = ("-zone=us-west1-b", "-project=my-proj", "-image-project=my-proj", "-image-name=custom-1",
             f"-provisioner-binary={binary}")  # fmt: skip
    expected = (
        f"cos-customizer: error: -provisioner-binary={binary} is writable by every user, so anyone could change it: "
        "chmod o-w it\n"
    )
    for extra in (("-dry-run",), ()):
        result = cli("finish-image-build", *flags, *extra, env={"COS_CUSTOMIZER_DAISY": "/nonexistent/daisy"})
        assert (result.code, result.err) == (1, expected)


def cli_with_memory_limit(tmp_path: Path, binary: Path) -> subprocess.CompletedProcess[str]:
    """build-provisioner with `binary` named, in a process of at most 1 GiB that must end within 60 s."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from cos_customizer.cli.main import main; sys.exit(main())")  # fmt: skip
    source = str(Path(cos_customizer.__file__).parents[1])  # the code this test imported
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": source, ENV: str(binary)}
    return subprocess.run([sys.executable, "-c", code, "build-provisioner", f"-output={tmp_path / 'out'}"],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip


def test_a_fifo_manifest_is_refused_at_once(tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path / "p")
    manifest = provisioner_build.manifest_path(binary)
    manifest.unlink()
    os.mkfifo(manifest)  # nobody ever writes it: an open that waits for a writer never returns
    result = cli_with_memory_limit(tmp_path, binary)
    assert (result.returncode, result.stderr) == (1, (
        f"cos-customizer: error: the prebuilt provisioner's manifest {manifest} is not a regular file: "
        "make both with python -m cos_customizer.provisioner_build DIR\n"
    ))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_huge_manifest_is_refused_without_reading_it(tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path / "p")
    manifest = provisioner_build.manifest_path(binary)
    with open(manifest, "r+b") as f:
        f.truncate(3 << 29)  # 1.5 GiB, sparse: over the process's 1 GiB if it were read
    result = cli_with_memory_limit(tmp_path, binary)
    assert (result.returncode, result.stderr) == (1, (
        f"cos-customizer: error: the prebuilt provisioner's manifest {manifest} is over the 64 KiB limit: "
        "make both with python -m cos_customizer.provisioner_build DIR\n"
    ))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_the_rehearsal_dry_run_checks_the_prebuilt_as_the_rehearsal_does(local_build: CLI, tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path / "prebuilt")
    output = tmp_path / "out.raw"
    flags = ("finish-image-build", "-executor=qemu", f"-output={output}")
    dry = local_build(*flags, "-dry-run", env={ENV: str(binary)})
    assert dry.code == 0, dry.err
    assert f"  CIDATA:    {binary} (prebuilt for this cos-customizer, checked against its manifest)\n" in dry.err
    binary.write_bytes(elf(body=b"changed after its manifest was written"))
    expected = (
        f"cos-customizer: error: the prebuilt provisioner {binary} (${ENV}) is not the file its manifest "
        f"{tmp_path / 'prebuilt' / 'provisioner.json'} describes (sha256 differs)\n"
    )
    real = local_build(*flags, env={ENV: str(binary)})
    assert (real.code, real.err) == (1, expected)
    dry = local_build(*flags, "-dry-run", env={ENV: str(binary)})
    assert (dry.code, dry.err, dry.out) == (1, expected, "")
    assert not output.exists()
    assert local_build("finish-image-build", "-executor=qemu", f"-output={output}", "-dry-run").code == 0  # kept


# --- arm64 (issue 23): a prebuilt for each machine, and -provisioner-binary checked against the source's ---

EM_X86_64, EM_AARCH64 = 62, 183  # the ELF specification's e_machine numbers (not this package's constants)
ENV_ARM64 = "COS_CUSTOMIZER_PROVISIONER_ARM64"


def make_arm64_prebuilt(directory: Path, content: bytes | None = None, **changes: Any) -> Path:
    """An aarch64 executable named as the step image names it, with the manifest written for arm64."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "provisioner-arm64"
    binary.write_bytes(elf(EM_AARCH64, b"arm64 provisioner stand-in") if content is None else content)
    binary.chmod(0o755)
    document = {**provisioner_build.manifest(binary, Arch.ARM64), **changes}
    provisioner_build.manifest_path(binary).write_text(json.dumps(document))
    return binary


def refused_arm64(environ: dict[str, str], default: Path | None = None) -> str:
    with pytest.raises(ValidationError) as caught:
        provisioner_build.prebuilt(environ, default, arch=Arch.ARM64)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_each_machine_has_its_variable_and_default_path() -> None:
    assert provisioner_build.prebuilt_location(Arch.AMD64) == (
        "COS_CUSTOMIZER_PROVISIONER",
        Path("/usr/lib/cos-customizer/provisioner"),
    )
    assert provisioner_build.prebuilt_location(Arch.ARM64) == (
        ENV_ARM64,
        Path("/usr/lib/cos-customizer/provisioner-arm64"),
    )
    assert provisioner_build.prebuilt_location() == provisioner_build.prebuilt_location(Arch.AMD64)


def test_the_arm64_manifest_records_arm64(tmp_path: Path) -> None:
    binary = make_arm64_prebuilt(tmp_path)
    document = json.loads((tmp_path / "provisioner-arm64.json").read_text())
    assert document["arch"] == "arm64"
    assert document["sha256"] == hashlib.sha256(binary.read_bytes()).hexdigest()


def test_an_arm64_prebuilt_is_chosen_by_its_own_variable_or_default(tmp_path: Path) -> None:
    arm64 = make_arm64_prebuilt(tmp_path / "arm64")
    amd64 = make_prebuilt(tmp_path / "amd64")
    assert provisioner_build.prebuilt({ENV_ARM64: str(arm64)}, arch=Arch.ARM64) == arm64
    assert provisioner_build.prebuilt({}, arm64, arch=Arch.ARM64) == arm64
    # Each machine's variable names that machine's only.
    assert provisioner_build.prebuilt({ENV: str(amd64)}, tmp_path / "absent", arch=Arch.ARM64) is None
    assert provisioner_build.prebuilt({ENV_ARM64: str(arm64)}, tmp_path / "absent") is None
    assert provisioner_build.prebuilt({ENV: str(amd64), ENV_ARM64: str(arm64)}) == amd64


def test_an_x86_64_prebuilt_is_refused_for_arm64_and_the_other_way(tmp_path: Path) -> None:
    amd64 = make_prebuilt(tmp_path / "amd64")
    assert refused_arm64({ENV_ARM64: str(amd64)}) == (
        f"the prebuilt provisioner {amd64} (${ENV_ARM64}) is not an arm64 ELF executable"
    )
    arm64 = make_arm64_prebuilt(tmp_path / "arm64")
    assert refused({ENV: str(arm64)}) == f"the prebuilt provisioner {arm64} (${ENV}) is not an x86-64 ELF executable"


@pytest.mark.parametrize(("machine", "recorded"), [(EM_AARCH64, "x86-64"), (EM_X86_64, "arm64")])
def test_a_manifest_naming_another_machine_is_refused(tmp_path: Path, machine: int, recorded: str) -> None:
    """The file is the machine's, but its manifest says it was built for the other one."""
    arch = Arch.ARM64 if machine == EM_AARCH64 else Arch.AMD64
    binary = make_prebuilt(tmp_path, content=elf(machine, b"mislabelled"), arch=recorded)
    variable = ENV_ARM64 if arch is Arch.ARM64 else ENV
    with pytest.raises(ValidationError) as caught:
        provisioner_build.check_prebuilt(binary, f"${variable}", arch=arch)
    message = str(caught.value)
    assert "\n" not in message
    flag = " -arch=arm64" if arch is Arch.ARM64 else ""
    assert message == (
        f"the prebuilt provisioner {binary} (${variable}) is recorded as built for {recorded!r} by its manifest "
        f"{tmp_path / 'provisioner.json'}, not {'arm64' if arch is Arch.ARM64 else 'x86-64'}: "
        f"make both with python -m cos_customizer.provisioner_build{flag} DIR"
    )


def test_an_x86_64_manifest_without_arch_is_still_accepted(tmp_path: Path) -> None:
    binary = make_prebuilt(tmp_path)
    document = json.loads((tmp_path / "provisioner.json").read_text())
    del document["arch"]
    (tmp_path / "provisioner.json").write_text(json.dumps(document))
    assert provisioner_build.prebuilt({ENV: str(binary)}) == binary
    with pytest.raises(ValidationError, match="is not an arm64 ELF executable"):
        provisioner_build.prebuilt({ENV_ARM64: str(binary)}, arch=Arch.ARM64)


def test_a_stale_arm64_prebuilt_names_the_arm64_rebuild(tmp_path: Path) -> None:
    binary = make_arm64_prebuilt(tmp_path, sources="0" * 32)
    assert refused_arm64({ENV_ARM64: str(binary)}).endswith(
        "rebuild it with python -m cos_customizer.provisioner_build -arch=arm64 DIR (or rebuild the step image)"
    )


def provisioner_binary_refusal(binary: Path, arch: Arch) -> str:
    with pytest.raises(ValidationError) as caught:
        provisioner_build.check_binary(binary, arch=arch)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_provisioner_binary_for_the_other_machine_is_refused(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_bytes(elf(EM_X86_64, b"x86-64 provisioner"))
    arm = tmp_path / "arm"
    arm.write_bytes(elf(EM_AARCH64, b"arm64 provisioner"))
    assert provisioner_binary_refusal(x86, Arch.ARM64) == (
        f"-provisioner-binary={x86} is an x86-64 ELF executable, and the source image is arm64: give a provisioner "
        "built for arm64 (cos-customizer build-provisioner -arch=arm64)"
    )
    assert provisioner_binary_refusal(arm, Arch.AMD64) == (
        f"-provisioner-binary={arm} is an arm64 ELF executable, and the source image is amd64: give a provisioner "
        "built for amd64 (cos-customizer build-provisioner)"
    )
    assert provisioner_build.check_binary(arm, arch=Arch.ARM64) == arm
    assert provisioner_build.check_binary(x86) == x86
    assert provisioner_build.check_binary(x86, arch=Arch.AMD64) == x86


def test_a_provisioner_binary_of_neither_machine_is_the_users_for_x86_64_only(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_bytes(b"#!/bin/sh\necho a provisioner of the user's own\n")
    assert provisioner_build.check_binary(script) == script  # as before: any file
    assert provisioner_binary_refusal(script, Arch.ARM64) == (
        f"-provisioner-binary={script} is not an ELF executable, and the source image is arm64: give a provisioner "
        "built for arm64 (cos-customizer build-provisioner -arch=arm64)"
    )
    i386 = tmp_path / "i386"
    header = bytearray(elf(3))
    header[4] = 1  # ELFCLASS32
    i386.write_bytes(bytes(header))
    assert provisioner_build.check_binary(i386) == i386  # neither machine's: the user's, as before
    assert "is an ELF executable for another machine, and the source image is arm64" in provisioner_binary_refusal(
        i386, Arch.ARM64
    )


def test_ship_copies_the_arm64_binary_and_refuses_an_x86_64_one_before_writing(tmp_path: Path) -> None:
    arm = tmp_path / "arm"
    arm.write_bytes(elf(EM_AARCH64, b"arm64 provisioner"))
    into = tmp_path / "cidata-provisioner"
    assert provisioner_build.ship(into, arm, {}, arch=Arch.ARM64) == into
    assert into.read_bytes() == arm.read_bytes()
    x86 = tmp_path / "x86"
    x86.write_bytes(elf(EM_X86_64, b"x86-64 provisioner"))
    other = tmp_path / "cidata-2"
    with pytest.raises(ValidationError, match="is an x86-64 ELF executable, and the source image is arm64"):
        provisioner_build.ship(other, x86, {}, arch=Arch.ARM64)
    assert not other.exists()
    prebuilt = make_arm64_prebuilt(tmp_path / "prebuilt")
    shipped = tmp_path / "cidata-3"
    assert provisioner_build.ship(shipped, None, {ENV_ARM64: str(prebuilt)}, tmp_path / "absent", arch=Arch.ARM64)
    assert shipped.read_bytes() == prebuilt.read_bytes()
    assert provisioner_build.check_choice(None, {ENV_ARM64: str(prebuilt)}, arch=Arch.ARM64) == prebuilt
    assert provisioner_build.check_choice(None, {ENV: str(prebuilt)}, tmp_path / "absent", arch=Arch.ARM64) is None


def test_build_provisioner_arm64_copies_the_arm64_prebuilt(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = make_arm64_prebuilt(tmp_path / "prebuilt")
    monkeypatch.setattr(provisioner_build, "build", lambda *_, **__: pytest.fail("built although a prebuilt was given"))
    for name in ("arm64", "aarch64"):
        output = tmp_path / f"out-{name}"
        result = cli("build-provisioner", f"-arch={name}", f"-output={output}", env={ENV_ARM64: str(binary)})
        assert result.code == 0, result.err
        assert f"prebuilt {binary})" in result.err
        assert output.read_bytes() == binary.read_bytes()
    # What $COS_CUSTOMIZER_PROVISIONER_ARM64 names is checked as the x86-64 one is: a directory is refused.
    result = cli("build-provisioner", "-arch=arm64", f"-output={tmp_path / 'x'}", env={ENV_ARM64: str(tmp_path)})
    assert result.code == 1
    assert result.err == (
        f"cos-customizer: error: the prebuilt provisioner {tmp_path} (${ENV_ARM64}) is not an executable file\n"
    )


def test_build_provisioner_refuses_an_unknown_arch_with_one_line(cli: CLI, tmp_path: Path) -> None:
    result = cli("build-provisioner", "-arch=sparc", f"-output={tmp_path / 'p'}")
    assert result.code == 1  # as every string flag's value check
    assert result.err == (
        "cos-customizer: error: invalid value \"sparc\" for flag -arch: unknown architecture 'sparc': use amd64 or arm64\n"
    )
    assert not (tmp_path / "p").exists()


def test_module_main_arch_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert provisioner_build.main(["-arch=sparc", "dir"]) == 2
    assert provisioner_build.main(["-arch=arm64"]) == 2
    assert "usage: python -m cos_customizer.provisioner_build [-arch=amd64|arm64] DIR" in capsys.readouterr().err


def test_the_x86_64_cache_key_is_unchanged_and_arm64_has_its_own() -> None:
    assert provisioner_build.source_digest(Arch.AMD64) == provisioner_build.source_digest()
    arm64 = provisioner_build.source_digest(Arch.ARM64, "root-1")
    assert arm64 not in (provisioner_build.source_digest(), provisioner_build.source_digest(Arch.ARM64, "root-2"))
