"""The provisioner command: usage, the metadata watcher, refusals (no root needed); the disk-layout
handler on a loop device with only the tools a COS image has (root)."""

from __future__ import annotations

import http.server
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cos_customizer import privilege, runner
from cos_customizer.disk import ext, gpt, loop, planner
from cos_customizer.provisioner.agent import plan_from
from cos_customizer.provisioner.main import main
from tests.integration.test_extmap import dumpe2fs_used

GiB = 1 << 30
# What the Go original relies on in the COS image for the layout, and losetup (util-linux, on COS too): on the
# VM's busy /dev/sda e2fsck and resize2fs refuse `?offset=` and get a loop device over the file system.
COS_TOOLS = ("e2fsck", "resize2fs", "losetup")


class Metadata(http.server.BaseHTTPRequestHandler):
    """A stand-in metadata server: the key appears after a few requests."""

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        ok = self.path.endswith("/DaisyEnd") and type(self).hits > 2 and self.headers["Metadata-Flavor"] == "Google"
        body = b"ack" if ok else b"not found"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def metadata(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    Metadata.hits = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("GCE_METADATA_HOST", host)
    yield host
    server.shutdown()


def test_wait_metadata_returns_when_the_key_appears(metadata: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cos_customizer.provisioner import main as module

    assert module.wait_metadata("DaisyEnd", timeout=30, interval=0.05) == 0
    assert capsys.readouterr().out == "metadata key DaisyEnd is set: ack\n"
    assert Metadata.hits == 3


def test_wait_metadata_times_out(metadata: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cos_customizer.provisioner import main as module

    assert module.wait_metadata("Other", timeout=0.2, interval=0.05) == 1
    assert "metadata key Other did not appear within 0 seconds" in capsys.readouterr().err


def test_usage_errors_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "cos_customizer.provisioner", "run"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "the following arguments are required: --config" in result.stderr


def test_resume_without_state_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"root": str(tmp_path), "disk": str(tmp_path / "disk"), "partition_template": ""}))
    assert main([f"--target={target}", "resume"]) == 1
    out = capsys.readouterr().out
    assert f"BuildFailed: {tmp_path}/var/lib/.cos-customizer/state.json does not exist: nothing to resume" in out


def test_unknown_step_in_the_config_names_the_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"Steps": [{"Type": "SealOEM"}, {"Type": "Reboot"}]}))
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"root": str(tmp_path), "disk": str(tmp_path / "disk")}))
    assert main([f"--target={target}", "run", f"--config={config}"]) == 1
    assert (
        f'BuildFailed: cannot use {config}: {config}: Steps[1]: unknown step type "Reboot"' in capsys.readouterr().out
    )
    assert not (tmp_path / "var").exists()  # refused before anything was written


def debugfs(image: Path, offset: int, request: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["debugfs", "-w", "-R", request, ext.device(image, offset)], capture_output=True, check=True)


@pytest.mark.root
@pytest.mark.skipif(not privilege.can_mount(), reason="needs root for a loop device")
@pytest.mark.parametrize(("oem_size", "disk_size"), [(GiB, 12 * GiB), (1024 * GiB, 1034 * GiB)])
def test_handle_disk_layout_on_a_block_device_runs_only_e2fsck_resize2fs_and_losetup(
    tmp_path: Path,
    sample_raw: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    oem_size: int,
    disk_size: int,
) -> None:
    """The shutdown handler as on the VM, after the reboots that reclaim ROOT-A and grow the disk:
    OEM and STATE move by the blocks their file systems use, grow with resize2fs only (on loop devices); e2image, tune2fs and dumpe2fs are not
    on PATH."""
    image = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(sample_raw), str(image)], check=True)
    table = gpt.read_table(image)
    root_a = table.partition(planner.ROOT_A)
    gpt.write_table(image, table.replace(root_a.moved(root_a.first, planner.SHRUNK_ROOT)))  # what shrink_root_a does
    os.truncate(image, disk_size)  # what the workflow's resize-disk step does
    rng = random.Random(oem_size)
    files: dict[tuple[int, str], bytes] = {}
    for number in (planner.OEM, planner.STATE):
        for i, size in enumerate((1, 4096, 300_000, 3 << 20)):
            content = rng.randbytes(size)
            local = tmp_path / f"f{number}-{i}"
            local.write_bytes(content)
            debugfs(image, table.partition(number).first * 512, f"write {local} f{i}")
            files[(number, f"/f{i}")] = content
    files[(planner.STATE, "/var_overlay/lib/sample-image")] = b"this file was on STATE before the build\n"
    oem_fs_4k = oem_size // 4096 * 127 // 128 - 8  # room for the verity tree, as when sealing
    inputs = {"disk_sectors": disk_size // 512, "reclaim_sda3": True, "oem_size": oem_size, "oem_fs_size_4k": oem_fs_4k}
    expected = plan_from({"disk": str(image), **inputs})
    assert [m.name for m in expected.moves] == ["OEM", "STATE"]
    # What each file system uses, by stock dumpe2fs: the handler copies that and no more (issue 24).
    used = {n: len(dumpe2fs_used(image, table.partition(n).first * 512)) * 4096 for n in (planner.OEM, planner.STATE)}

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in COS_TOOLS:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        assert found is not None
        (bin_dir / name).symlink_to(found)
    with loop.attach(image) as disk:
        plan_file = tmp_path / "layout.json"
        plan_file.write_text(json.dumps({"disk": str(disk), **inputs}))
        with monkeypatch.context() as env:
            env.setenv("PATH", str(bin_dir))
            env.setattr(runner, "FALLBACK_DIRS", ())
            for absent in ("e2image", "tune2fs", "dumpe2fs", "sfdisk"):
                with pytest.raises(runner.MissingToolError):
                    runner.require_tool(absent, "e2fsprogs")
            with caplog.at_level(logging.DEBUG, logger="cos_customizer.run"):
                assert main(["handle-disk-layout", f"--plan={plan_file}"]) == 0
    out = capsys.readouterr().out
    assert f"moving the {used[planner.OEM] / 2**20:.1f} MiB OEM uses of 16.0 MiB\n" in out, out
    assert f"moving the {used[planner.STATE] / 2**20:.1f} MiB STATE uses of " in out, out
    assert f"Disk space: the relocation copied {sum(used.values()) / 2**20:.1f} MiB and discarded " in out, out
    assert out.endswith("Partitions relocated\n")
    ran = [record.getMessage().removeprefix("run: ").split()[0] for record in caplog.records]
    # losetup only where the kernel cannot attach with LOOP_CONFIGURE (disk.loop attaches by ioctl since 5.8)
    assert {"e2fsck", "resize2fs"} <= {Path(tool).name for tool in ran} <= set(COS_TOOLS), ran

    after = gpt.read_table(image)
    assert after == expected.after
    assert "No problems found" in subprocess.run(["sgdisk", "-v", str(image)], capture_output=True, text=True).stdout
    oem, state = after.partition(planner.OEM), after.partition(planner.STATE)
    for part in (oem, state):
        result = subprocess.run(["e2fsck", "-fn", ext.device(image, part.first * 512)], capture_output=True)
        assert result.returncode == 0, result.stdout + result.stderr
    assert ext.info(image, oem.first * 512).size == oem_fs_4k * 4096
    assert ext.info(image, state.first * 512).size == state.size * 512 // 4096 * 4096
    for (number, name), content in files.items():
        offset = after.partition(number).first * 512
        assert debugfs(image, offset, f"cat {name}").stdout == content, (number, name)
    assert os.stat(image).st_blocks * 512 < 256 << 20  # zeros became holes, not written blocks
    # What a partition held before and none holds after (the OEM's and STATE's old places, ROOT-A's shrunk
    # tail) was discarded: the loop device punched holes there, so no data is left in it (SEEK_DATA).
    taken = [(p.first * 512, (p.last + 1) * 512) for p in after.partitions]
    with open(image, "rb") as f:
        for part in table.partitions:
            start, end = part.first * 512, (part.last + 1) * 512
            pieces = [(start, end)]
            for first, stop in taken:
                pieces = [
                    piece for a, b in pieces for piece in ((a, min(b, first)), (max(a, stop), b)) if piece[0] < piece[1]
                ]
            for a, b in pieces:
                try:
                    data = os.lseek(f.fileno(), a, os.SEEK_DATA)
                except OSError:  # ENXIO: only holes up to the end of the file
                    continue
                assert data >= b, (part.name, a, b, data)
