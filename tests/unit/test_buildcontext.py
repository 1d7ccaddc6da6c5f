"""The build context archive: names, modes, links, refusals."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from cos_customizer import buildcontext
from cos_customizer.errors import ValidationError


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_directory_names_modes_and_links(tmp_path: Path, context_dir: Path) -> None:
    (context_dir / "link.sh").symlink_to("preload.sh")
    (context_dir / "dangling").symlink_to("/nowhere")
    archive = tmp_path / "ctx.tar"
    count = buildcontext.create_archive(context_dir, archive)
    found = members(archive)
    assert sorted(found) == [
        "dangling",
        "lib",
        "lib/mylib.sh",
        "link.sh",
        "pkgspec",
        "pkgspec/k8s.yaml",
        "preload.sh",
        "tool.sh",
    ]
    assert count == len(found)
    assert found["tool.sh"].mode & 0o777 == 0o755
    assert found["link.sh"].issym() and found["link.sh"].linkname == "preload.sh"
    assert found["dangling"].issym() and found["dangling"].linkname == "/nowhere"
    assert found["lib"].isdir()
    with tarfile.open(archive) as tar:
        extracted = tar.extractfile("lib/mylib.sh")
        assert extracted is not None
        assert extracted.read() == b"greet() { echo hi; }\n"


def test_symlinked_directory_is_not_followed(tmp_path: Path, context_dir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    (context_dir / "out").symlink_to(outside)
    archive = tmp_path / "ctx.tar"
    buildcontext.create_archive(context_dir, archive)
    assert "out/secret" not in members(archive)
    assert members(archive)["out"].issym()


def test_single_file_context(tmp_path: Path, context_dir: Path) -> None:
    archive = tmp_path / "ctx.tar"
    assert buildcontext.create_archive(context_dir / "preload.sh", archive) == 1
    assert list(members(archive)) == ["preload.sh"]


def test_workspace_inside_the_context_is_left_out(tmp_path: Path, context_dir: Path) -> None:
    ws = context_dir / ".cos-customizer-workdir"
    ws.mkdir()
    (ws / "user_build_context.tar").write_text("old")
    archive = tmp_path / "ctx.tar"
    buildcontext.create_archive(context_dir, archive, exclude=(ws,))
    assert not any(name.startswith(".cos-customizer-workdir") for name in members(archive))


def test_missing_context(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as err:
        buildcontext.create_archive(tmp_path / "nope", tmp_path / "ctx.tar")
    assert str(err.value) == (
        f"build context {tmp_path / 'nope'} does not exist: pass -build-context=DIR, "
        "the directory holding your scripts and files"
    )


@pytest.mark.parametrize(
    ("path", "member"),
    [
        ("preload.sh", "preload.sh"),
        ("./preload.sh", "preload.sh"),
        ("lib/../preload.sh", "preload.sh"),
        ("lib/", "lib"),
    ],
)
def test_normalize_member(path: str, member: str) -> None:
    assert buildcontext.normalize_member(path, "-script") == member


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", "-script=/etc/passwd: give a path relative to the build context, not an absolute path"),
        ("../x.sh", "-script=../x.sh: the path leaves the build context"),
        ("", "-script must be set"),
    ],
)
def test_normalize_member_refuses(path: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        buildcontext.normalize_member(path, "-script")
    assert str(err.value) == message


def test_find_member(tmp_path: Path, context_dir: Path) -> None:
    archive = tmp_path / "ctx.tar"
    buildcontext.create_archive(context_dir, archive)
    found = buildcontext.find_member(archive, "lib/mylib.sh")
    assert found is not None and found.isfile()
    found = buildcontext.find_member(archive, "lib")
    assert found is not None and found.isdir()
    assert buildcontext.find_member(archive, "nope.sh") is None
    assert buildcontext.find_member(archive, "lib/mylib") is None
