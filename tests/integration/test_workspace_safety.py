"""The user's own files and concurrent builds: the workspace never takes what the tool did not make.

Paths inside the workspace (resolved, symlinks followed) are refused as the source image and as the output,
and two commands on the same workspace or writing the same output do not run at once: the second fails at
once, naming the first one's pid. Each command runs as its own process, as users run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cos_customizer import privilege
from tests.conftest import CLI, Result, data_digest, read_until, sh, snapshot

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root: a local build mounts loop devices"),
]

TIMEOUT = 120


def env_for(tmp: Path, workspace: Path) -> dict[str, str]:
    return {
        "HOME": str(tmp),
        "COS_CUSTOMIZER_WORKDIR": str(workspace),
        "PATH": os.environ["PATH"],
        **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
    }


def cli(env: dict[str, str], *argv: str) -> Result:
    result = subprocess.run(
        [sys.executable, "-m", "cos_customizer", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return Result(result.returncode, result.stdout, result.stderr)


def started(tmp: Path, sample: Path, workspace: Path, scripts: dict[str, str] | None = None) -> dict[str, str]:
    context = tmp / f"context-{workspace.name}"
    context.mkdir()
    for name, text in (scripts or {"ok.sh": "true\n"}).items():
        (context / name).write_text(text)
    image = tmp / f"image-{workspace.name}.raw"
    sh("cp", "--sparse=always", sample, image)
    env = env_for(tmp, workspace)
    result = cli(env, "start-image-build", f"-build-context={context}", f"-image-file={image}")
    assert result.code == 0, result.err
    for name in scripts or {}:
        result = cli(env, "run-script", f"-script={name}")
        assert result.code == 0, result.err
    return env


# Paths inside the workspace


def workspace_files(workspace: Path) -> dict[str, bytes | str]:
    """The workspace's files with their bytes (the user's image in it: its data digest)."""
    return {
        str(p.relative_to(workspace)): data_digest(p) if p.name == "mine.img" else p.read_bytes()
        for p in sorted(workspace.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("via", ["direct", "symlink-to-file", "symlinked-dir"])
def test_image_file_inside_the_workspace_is_refused(tmp_path: Path, sample_raw: Path, via: str) -> None:
    workspace = tmp_path / "ws"
    env = started(tmp_path, sample_raw, workspace)
    mine = workspace / "mine.img"
    sh("cp", "--sparse=always", sample_raw, mine)
    digest = data_digest(mine)
    given = {
        "direct": mine,
        "symlink-to-file": tmp_path / "link.img",
        "symlinked-dir": tmp_path / "alias" / "mine.img",
    }[via]
    if via == "symlink-to-file":
        given.symlink_to(mine)
    elif via == "symlinked-dir":
        given.parent.symlink_to(workspace)
    before = workspace_files(workspace)
    result = cli(env, "start-image-build", f"-build-context={tmp_path / 'context-ws'}", f"-image-file={given}")
    assert (result.code, result.out, result.err) == (
        1,
        "",
        f"cos-customizer: error: -image-file={given} is inside the workspace {workspace}, which start-image-build "
        "replaces and finish-image-build removes: move the image out of it, or choose another -local-state-workdir\n",
    )
    assert workspace_files(workspace) == before
    assert data_digest(mine) == digest


@pytest.mark.parametrize("via", ["direct", "symlinked-dir"])
def test_output_inside_the_workspace_is_refused(tmp_path: Path, sample_raw: Path, via: str) -> None:
    workspace = tmp_path / "ws"
    env = started(tmp_path, sample_raw, workspace)
    output = workspace / "out.img"
    if via == "symlinked-dir":
        (tmp_path / "alias").symlink_to(workspace)
        output = tmp_path / "alias" / "out.img"
    before = snapshot(workspace)
    for dry in (["-dry-run"], []):
        result = cli(env, "finish-image-build", f"-output={output}", *dry)
        assert (result.code, result.out, result.err) == (
            1,
            "",
            f"cos-customizer: error: -output={output} is inside the workspace {workspace}, which "
            "finish-image-build removes when it ends: write the image outside the workspace\n",
        )
        assert snapshot(workspace) == before
    assert not (workspace / "out.img").exists()


# Two commands at once


SLOW = "echo started\nsleep 15\necho 'first build' > /var/lib/first\n"


def test_two_commands_at_once_on_one_workspace_or_one_output(tmp_path: Path, sample_raw: Path) -> None:
    """A build runs; a second finish on its workspace, a start-image-build over it and a finish from another
    workspace with the same -output each fail at once with the running build's pid; the build is unharmed."""
    first_ws, second_ws = tmp_path / "ws", tmp_path / "ws2"
    first = started(tmp_path, sample_raw, first_ws, {"slow.sh": SLOW})
    second = started(tmp_path, sample_raw, second_ws)
    output = tmp_path / "out.raw"
    lock = tmp_path / ".out.raw.lock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cos_customizer", "finish-image-build", f"-output={output}"],
        env=first,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        read_until(proc.stderr, "[run-script slow.sh] started", "the first build's script never started")
        assert not lock.exists()  # the output's lock is no file (output.held)
        before = snapshot(first_ws), snapshot(second_ws)
        began = time.monotonic()

        other = tmp_path / "other.raw"
        result = cli(first, "finish-image-build", f"-output={other}")
        assert (result.code, result.out, result.err) == (
            1,
            "",
            f"cos-customizer: error: the workspace {first_ws} is in use by another cos-customizer (pid {proc.pid}): "
            "wait for it to finish, or give this build its own -local-state-workdir\n",
        )
        assert not other.exists()

        result = cli(
            first,
            "start-image-build",
            f"-build-context={tmp_path / 'context-ws2'}",
            f"-image-file={tmp_path / 'image-ws2.raw'}",
        )
        assert (result.code, result.out, result.err) == (
            1,
            "",
            f"cos-customizer: error: the workspace {first_ws} is in use by another cos-customizer (pid {proc.pid}): "
            "wait for it to finish, or give this build its own -local-state-workdir\n",
        )

        result = cli(second, "finish-image-build", f"-output={output}")
        assert (result.code, result.out, result.err) == (
            1,
            "",
            f"cos-customizer: error: -output={output} is in use by another cos-customizer (pid {proc.pid}) "
            "writing the same output: wait for it to finish, or choose another -output\n",
        )
        assert proc.poll() is None, "the first build ended before the others were tried: the test proved nothing"
        assert time.monotonic() - began < 15
        assert (snapshot(first_ws), snapshot(second_ws)) == before
        assert not output.exists()

        rest = proc.stderr.read()
        assert proc.wait(timeout=TIMEOUT) == 0, rest
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    state = int(sh("sgdisk", "-i", "1", output).stdout.split("First sector: ")[1].split()[0]) * 512
    debugfs = sh("debugfs", "-R", "cat /var_overlay/lib/first", f"{output}?offset={state}")
    assert debugfs.stdout == "first build\n"
    assert not lock.exists()
    assert not first_ws.exists()
    # The second workspace is still there, and its build can now run.
    result = cli(second, "finish-image-build", f"-output={tmp_path / 'second.raw'}")
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_step_while_another_command_holds_the_workspace_is_refused(local_build: CLI, workspace_root: Path) -> None:
    """run-script, seal-oem and the other steps edit the config only while holding the workspace."""
    from cos_customizer.workspace import Workspace

    before = (workspace_root / "config/provisioner").read_text()
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom cos_customizer.workspace import Workspace\n"
        "with Workspace(Path(sys.argv[1])).lock():\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(workspace_root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        result = local_build("seal-oem")
        assert (result.code, result.err) == (1, (
            f"cos-customizer: error: the workspace {workspace_root} is in use by another cos-customizer "
            f"(pid {holder.pid}): wait for it to finish, or give this build its own -local-state-workdir\n"
        ))  # fmt: skip
        assert (workspace_root / "config/provisioner").read_text() == before
        assert Workspace(workspace_root).root.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert local_build("seal-oem").code == 0
