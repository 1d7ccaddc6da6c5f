"""Only a workspace the tool made is ever replaced or removed (issue 20, "User files deleted").

A directory given as -local-state-workdir that the tool did not make (the build file's own directory, $HOME
through `-local-state-workdir=.`, a planted or linked marker, a link to a workspace) is refused with one
line and left byte for byte, mode for mode, as it was. An empty directory is taken over. Even in a workspace
the tool made, finish removes only the files the layout names, never through a link.

Oracles: the user's files read back by the test (bytes, modes, link targets) before and after; the marker's
text as the README documents it, written by the test.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from cos_customizer.workspace import Workspace
from tests.conftest import CLI, Result

GCE_START = [
    "-image-project=cos-cloud",
    "-image-name=cos-stable-109-17800-66-0",
    "-gcs-bucket=bucket",
    "-gcs-workdir=build-1",
]
MARKER = ".cos-customizer-workspace"
MARKER_TEXT = (
    b"cos-customizer workspace: made by start-image-build, which replaces it; finish-image-build removes it.\n"
)
BUILD_FILE = """\
source:
  image-project: cos-cloud
  image-name: cos-stable-109-17800-66-0
  gcs-bucket: bucket
  gcs-workdir: build-1
build-context: ctx
steps:
  - run-script: {script: preload.sh}
finish:
  zone: us-west1-b
  project: my-proj
  image-project: my-proj
  image-name: out
"""

Entry = tuple[str, int, bytes]


def tree(root: Path) -> dict[str, Entry]:
    """Every entry under `root` and `root` itself ("."): kind, permission bits, bytes (a link: its target)."""
    entries: dict[str, Entry] = {}
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in [".", *dirs, *files] if top == str(root) else [*dirs, *files]:
            path = Path(top) / name if name != "." else root
            info = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                entries[key] = ("link", 0, os.readlink(path).encode())
            elif stat.S_ISDIR(info.st_mode):
                entries[key] = ("dir", stat.S_IMODE(info.st_mode), b"")
            else:
                entries[key] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return entries


def user_project(directory: Path) -> None:
    """A user's directory: a build file, its build context and an unrelated file."""
    (directory / "ctx").mkdir(parents=True, exist_ok=True)
    (directory / "ctx" / "preload.sh").write_text("echo hello > /var/lib/hello\n")
    (directory / "build.yaml").write_text(BUILD_FILE)
    (directory / "notes.txt").write_text("my notes, nobody else's\n")


def refused(result: Result, message: str, said: str = "") -> None:
    """Exit 1, nothing on stdout, `said` (progress lines) and then the one error line on stderr."""
    assert (result.code, result.out, result.err) == (1, "", f"{said}cos-customizer: error: {message}\n")


# Point 5: `build -dry-run DIR/build.yaml` with DIR as the workspace


@pytest.mark.parametrize("directory", ["the user's own", "a workspace of the tool's"])
def test_build_with_the_build_files_directory_as_workspace_is_refused(
    cli: CLI, tmp_path: Path, context_dir: Path, directory: str
) -> None:
    project = tmp_path / "project"
    if directory == "a workspace of the tool's":
        start = cli(f"-local-state-workdir={project}", "start-image-build", f"-build-context={context_dir}", *GCE_START)
        assert start.code == 0, start.err
    else:
        project.mkdir()
    user_project(project)
    before = tree(project)
    for dry_run in (["-dry-run"], []):
        result = cli(f"-local-state-workdir={project}", "build", *dry_run, str(project / "build.yaml"))
        refused(result, f"{project / 'build.yaml'} is inside the workspace {project}, which the build replaces and "
                "removes: move the build file out of it, or choose another -local-state-workdir")  # fmt: skip
        assert tree(project) == before


def test_build_into_a_users_directory_holding_its_context_is_refused(
    cli: CLI, tmp_path: Path, workspace_root: Path
) -> None:
    """The build file elsewhere; the workspace the user's directory holding the build context and a file."""
    project = tmp_path / "project"
    project.mkdir()
    user_project(project)
    (project / "build.yaml").unlink()
    (tmp_path / "build.yaml").write_text(BUILD_FILE.replace("build-context: ctx", "build-context: project/ctx"))
    before = tree(project)
    build = tmp_path / "build.yaml"
    result = cli(f"-local-state-workdir={project}", "build", "-dry-run", str(build))
    refused(result, f"{build}:1: source: the workspace {project} is not empty and not one cos-customizer made (it "
            f"has no {MARKER} of its own), and cos-customizer replaces and removes only its own: give a new or "
            "empty directory as -local-state-workdir", said=f"{build}:1: start-image-build (1 of 3)\n")  # fmt: skip
    assert tree(project) == before
    assert not workspace_root.exists()


# Point 6: `-local-state-workdir=.` is $HOME


@pytest.mark.parametrize("given", [".", "../home"])
@pytest.mark.parametrize("empty", [False, True], ids=["home", "empty-home"])
def test_start_with_home_as_workspace_is_refused(
    cli: CLI, home: Path, context_dir: Path, given: str, empty: bool
) -> None:
    if not empty:
        ssh = home / ".ssh"
        ssh.mkdir(mode=0o700)
        (ssh / "id_ed25519").write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
        (ssh / "id_ed25519").chmod(0o600)
        (ssh / "authorized_keys").write_text("ssh-ed25519 AAAA me\n")
        (home / ".profile").write_text("export EDITOR=vi\n")
        (home / ".config").mkdir()
        (home / ".config" / "build").write_text("a file named like a workspace's\n")
    home.chmod(0o751)
    before = tree(home)
    result = cli(f"-local-state-workdir={given}", "start-image-build", f"-build-context={context_dir}", *GCE_START)
    refused(result, f"the workspace {home / given} is your home directory: a relative "
            "-local-state-workdir is under $HOME; name a directory of its own, such as "
            f"{home / '.cos-customizer-workdir'} (the default)")  # fmt: skip
    assert tree(home) == before


# Directories the tool did not make


def plant(directory: Path, how: str) -> None:
    directory.mkdir()
    (directory / "notes.txt").write_text("mine\n")
    if how == "marker with other text":
        (directory / MARKER).write_bytes(b"cos-customizer workspace\n")
    elif how == "marker as a link":
        (directory.parent / "real-marker").write_bytes(MARKER_TEXT)
        (directory / MARKER).symlink_to(directory.parent / "real-marker")
    elif how == "marker as a directory":
        (directory / MARKER).mkdir()


@pytest.mark.parametrize("how", ["no marker", "marker with other text", "marker as a link", "marker as a directory"])
def test_a_directory_the_tool_did_not_make_is_never_replaced(
    cli: CLI, tmp_path: Path, context_dir: Path, how: str
) -> None:
    mine = tmp_path / "mine"
    plant(mine, how)
    before = tree(tmp_path)
    result = cli(f"-local-state-workdir={mine}", "start-image-build", f"-build-context={context_dir}", *GCE_START)
    refused(result, f"the workspace {mine} is not empty and not one cos-customizer made (it has no {MARKER} of its "
            "own), and cos-customizer replaces and removes only its own: give a new or empty directory as "
            "-local-state-workdir")  # fmt: skip
    assert tree(tmp_path) == before


@pytest.mark.parametrize("planted", [False, True], ids=["started-here", "marker-copied-in"])
def test_a_users_file_in_a_workspace_stops_its_replacement(
    cli: CLI, workspace_root: Path, context_dir: Path, planted: bool
) -> None:
    if planted:  # the exact marker copied into a user's directory: its files still are not the tool's
        workspace_root.mkdir()
        (workspace_root / MARKER).write_bytes(MARKER_TEXT)
        (workspace_root / "config").mkdir()
        (workspace_root / "config" / "build").write_text("mine\n")
    else:
        assert cli("start-image-build", f"-build-context={context_dir}", *GCE_START).code == 0
    (workspace_root / "notes.txt").write_text("mine\n")
    (workspace_root / "config" / "draft.yaml").write_text("mine too\n")
    before = tree(workspace_root)
    result = cli("start-image-build", f"-build-context={context_dir}", *GCE_START)
    refused(result, f"the workspace {workspace_root} holds config/draft.yaml, notes.txt, which cos-customizer did "
            "not put there and start-image-build would remove: move it out of the workspace, or choose another "
            "-local-state-workdir")  # fmt: skip
    assert tree(workspace_root) == before


def test_a_link_to_a_workspace_is_refused(cli: CLI, tmp_path: Path, workspace_root: Path, context_dir: Path) -> None:
    assert cli("start-image-build", f"-build-context={context_dir}", *GCE_START).code == 0
    link = tmp_path / "link"
    link.symlink_to(workspace_root)
    before = tree(tmp_path)
    result = cli(f"-local-state-workdir={link}", "start-image-build", f"-build-context={context_dir}", *GCE_START)
    refused(result, f"the workspace {link} is a symbolic link, and cos-customizer never replaces or removes "
            "through a link: give the directory itself, or a new one, as -local-state-workdir")  # fmt: skip
    assert tree(tmp_path) == before


def test_a_file_as_workspace_is_refused(cli: CLI, tmp_path: Path, context_dir: Path) -> None:
    mine = tmp_path / "mine"
    mine.write_text("mine\n")
    result = cli(f"-local-state-workdir={mine}", "start-image-build", f"-build-context={context_dir}", *GCE_START)
    refused(result, f"the workspace {mine} is not a directory: choose another -local-state-workdir")
    assert mine.read_text() == "mine\n"


def test_an_empty_directory_is_taken_over_and_marked(cli: CLI, workspace_root: Path, context_dir: Path) -> None:
    workspace_root.mkdir(mode=0o777)
    result = cli("start-image-build", f"-build-context={context_dir}", *GCE_START)
    assert result.code == 0, result.err
    assert (workspace_root / MARKER).read_bytes() == MARKER_TEXT
    assert stat.S_IMODE(workspace_root.stat().st_mode) == 0o700  # the tool's own directory now
    assert cli("seal-oem").code == 0
    again = cli("start-image-build", f"-build-context={context_dir}", *GCE_START)
    assert again.code == 0, again.err
    assert sorted(p.name for p in workspace_root.iterdir()) == [MARKER, "config", "user_build_context.tar"]
    assert sorted(p.name for p in workspace_root.parent.iterdir() if p.name.startswith(".ws")) == []


# What finish removes at the end


def test_a_workspace_the_tool_made_is_removed_whole(cli: CLI, workspace_root: Path, context_dir: Path) -> None:
    assert cli("start-image-build", f"-build-context={context_dir}", *GCE_START).code == 0
    Workspace(workspace_root).remove()
    assert not workspace_root.exists()


@pytest.mark.parametrize(
    "case", ["the original's workspace (no marker)", "marker as a link", "a user's file in it", "config as a link"]
)
def test_remove_takes_only_the_tools_own_files(
    cli: CLI,
    tmp_path: Path,
    workspace_root: Path,
    context_dir: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    assert cli("start-image-build", f"-build-context={context_dir}", *GCE_START).code == 0
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    for name in ("source_image", "build", "provisioner", "keep.txt"):
        (decoy / name).write_text(f"the user's {name}\n")
    if case == "the original's workspace (no marker)":
        (workspace_root / MARKER).unlink()
    elif case == "marker as a link":
        (workspace_root / MARKER).rename(tmp_path / "moved-marker")
        (workspace_root / MARKER).symlink_to(tmp_path / "moved-marker")
    elif case == "a user's file in it":
        (workspace_root / "notes.txt").write_text("mine\n")
    else:
        for path in (workspace_root / "config").iterdir():
            path.unlink()
        (workspace_root / "config").rmdir()
        (workspace_root / "config").symlink_to(decoy)
    before = tree(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Workspace(workspace_root).remove()
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith("decoy")} == {
        k: v for k, v in before.items() if k.startswith("decoy")
    }
    left = sorted(str(p.relative_to(workspace_root)) for p in workspace_root.iterdir())
    if case in ("the original's workspace (no marker)", "marker as a link"):
        assert after == before
        note = f"it is not a workspace this cos-customizer made (no {MARKER} of its own); nothing was removed"
    elif case == "a user's file in it":
        assert left == [MARKER, "notes.txt"]
        assert (workspace_root / "notes.txt").read_text() == "mine\n"
        note = "it holds notes.txt, which cos-customizer did not make; only its own files were removed"
    else:
        assert left == [MARKER, "config"]
        note = "it holds config, which cos-customizer did not make; only its own files were removed"
    assert [r.getMessage() for r in caplog.records] == [f"note: left the workspace {workspace_root}: {note}"]


def test_a_workspace_named_through_itself_is_replaced_in_place(
    cli: CLI, tmp_path: Path, workspace_root: Path, context_dir: Path
) -> None:
    """ws/../ws: moving the old workspace aside must not lose the path the new one goes to."""
    given = f"-local-state-workdir={workspace_root}/../{workspace_root.name}"
    for _ in range(2):
        result = cli(given, "start-image-build", f"-build-context={context_dir}", *GCE_START)
        assert result.code == 0, result.err
    assert sorted(p.name for p in workspace_root.iterdir()) == [MARKER, "config", "user_build_context.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["context", "home", "ws"]
