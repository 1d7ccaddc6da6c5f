"""`finish-image-build -executor=qemu` end to end: the GCE workflow, the shipped provisioner under systemd.

The source is `sample-image -bootable` (a Debian systemd root in COS's layout, booted as COS's GRUB
boots it); QEMU runs under TCG here. The oracles are independent of the code under test: sgdisk,
veritysetup with grub.cfg's parameters, debugfs, e2fsck, and the local executor's build of the same
inputs (a different path to the same result: no VM, no reboots, no shutdown unit).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cos_customizer import privilege
from cos_customizer.cli.main import main
from cos_customizer.disk import ext, gpt, grub
from cos_customizer.executors.qemu import instances as qemu_instances
from cos_customizer.executors.qemu import rehearsal
from cos_customizer.executors.qemu.boot import BootChoice
from tests import registry
from tests.conftest import data_digest, sh
from tests.guest import test_boot_outputs as boot_outputs
from tests.integration.test_local_build import cat, cli, copy_of, exists, leaks, start, verity_verify
from tests.local_attacker import attack, own_socket_inodes, unreachable
from tests.shipped import shipped_provisioner

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root (debootstrap, loop devices for the checks)"),
]

SCRIPT = """set -e
if [ -f ubuntu.tar ]; then docker load -i ubuntu.tar; fi
echo "hello from the build" > /var/lib/hello
echo "kept on STATE" > /mnt/stateful_partition/hello
echo "in the OEM" > /usr/share/oem/hello
echo "$GREETING [$LIST] from $(pwd)" > /var/lib/greeting
echo "home: $HOME $(touch "$HOME/.w" && rm "$HOME/.w" && echo writable)"
cp /bin/true /tmp/true-copy
if /tmp/true-copy 2>/dev/null; then echo "tmp: exec"; else echo "tmp: noexec"; fi
env | sort | sed 's/^/env: /'
sed 's/^/mountinfo: /' /proc/self/mountinfo
if [ -n "${STORAGE_EMULATOR_HOST:-}" ]; then
  python3 - "$STORAGE_EMULATOR_HOST" <<'EOF' || true
import sys, urllib.error, urllib.request
url = sys.argv[1] + "/storage/v1/b/cos-customizer-local/o/cos-customizer%2Fuser_build_context.tar?alt=media"
try:
    urllib.request.urlopen(url, timeout=10)
    print("anonymous GCS read: allowed")
except urllib.error.HTTPError as err:
    print(f"anonymous GCS read: HTTP {err.code}")
EOF
fi
echo "step done"
"""
STEPS = [["run-script", "-script=preload.sh", "-env=GREETING=hi,LIST=a,b"], ["seal-oem"], ["disable-auto-update"]]
FINISH = ["-oem-size=1G", "-disk-size-gb=12", "-timeout=25m"]


def _qemu_processes(mark: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in argv and mark.encode() in argv:
                found.append(int(entry.name))
    return found


def _ubuntu(tmp: Path) -> bytes:
    """A `docker save` archive of busybox tagged ubuntu:latest, for SCRIPT to load from the build context."""
    registry.busybox_layer(tmp / "busybox.tar")
    registry.docker_archive(tmp / "ubuntu.tar", "ubuntu:latest", [tmp / "busybox.tar"])
    return (tmp / "ubuntu.tar").read_bytes()


def _rehearse(tmp: Path, source: Path, steps: list[list[str]], finish: list[str]) -> tuple[int, str, str, Path]:
    files: dict[str, str | bytes] = {"preload.sh": SCRIPT, "fail.sh": "echo about to fail\nexit 7\n",
                                     "slow.sh": "echo sleeping\nsleep 900\n", "ubuntu.tar": _ubuntu(tmp)}  # fmt: skip
    started = start(tmp, copy_of(source, tmp), files, steps)
    (tmp / "t").mkdir()
    env = {**started.env, "TMPDIR": str(tmp / "t"), "COS_CUSTOMIZER_QEMU_ACCEL": "tcg"}
    output = tmp / "out.raw"
    code, out, err = cli(env, "finish-image-build", "-executor=qemu", f"-output={output}",
                         f"-provisioner-binary={shipped_provisioner()}", *finish)  # fmt: skip
    (tmp / "tool-output.txt").write_text(err)  # for whoever reads a failure
    return code, out, err, output


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory: pytest.TempPathFactory, bootable_raw: Path) -> Iterator[tuple[int, str, str, Path]]:
    tmp = tmp_path_factory.mktemp("rehearsed")
    result = _rehearse(tmp, bootable_raw, STEPS, FINISH)
    yield result
    assert _qemu_processes(str(tmp)) == []


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, bootable_raw: Path) -> Path:
    """The same build through the local executor."""
    tmp = tmp_path_factory.mktemp("local")
    started = start(tmp, copy_of(bootable_raw, tmp), {"preload.sh": SCRIPT, "ubuntu.tar": _ubuntu(tmp)}, STEPS)
    code, _, err = cli(started.env, "finish-image-build", f"-output={tmp / 'out.raw'}", *FINISH)
    assert code == 0, err
    return tmp / "out.raw"


def _layout(table: gpt.Table) -> list[tuple[object, ...]]:
    return [(p.number, p.name, p.first, p.last, p.type_guid, p.guid, p.attributes) for p in table.partitions]


def _hexless(cfg: str) -> str:
    return re.sub(r"\b[0-9a-f]{64}\b", "<hex>", cfg)


def test_the_rehearsal_builds_what_the_local_executor_builds(
    rehearsed: tuple[int, str, str, Path], local: Path
) -> None:
    code, out, err, raw = rehearsed
    assert code == 0, err[-3000:]
    assert "Build succeeded" in out
    # The workflow ran every step; the guest rebooted as the original's provisioner does.
    for step in ("copy-gcs", "create-images", "setup", "run", "wait-for-resize", "resize-disk",
                 "wait-preload-finished", "send-logging-end-msg", "wait-vm-shutdown", "image"):  # fmt: skip
        assert f"workflow step {step} (" in err and re.search(rf"workflow step {step} \(\w+\) finished", err), step
    reboots = re.findall(r"preload-vm: the guest rebooted \(QEMU: guest-reset\)", err)
    assert len(reboots) == 3, err[-3000:]  # switch root, shrink ROOT-A, relocate at shutdown
    assert "Guest: 4 boot(s)" in out
    assert "BuildStatus: waiting for the boot disk size to change" in err
    assert "BuildStatus: Partitions relocated" in err  # the shutdown unit's ExecStop, at a real shutdown
    assert "BuildSucceeded:" in err
    # Issue 24: the relocation copied what STATE and the OEM use (megabytes), not the partitions (6 GB); the
    # rest, and STATE's free space after the cleanup, went back to the disk: the output's allocated size is
    # the local executor's (its working copy is sparse) within a few MiB.
    copied = re.search(
        r"^Disk space: the relocation copied ([\d.]+) (KiB|MiB|GiB) and discarded ([\d.]+) GiB in [\d.]+ s$", out, re.M
    )
    assert copied is not None, out
    assert copied[2] != "GiB" and float(copied[3]) > 5, copied[0]
    assert re.search(r"^Disk space: trimmed [\d.]+ \w+ of free space on /mnt/stateful_partition$", out, re.M), out
    allocated, local_allocated = raw.stat().st_blocks * 512, local.stat().st_blocks * 512
    print(f"allocated: rehearsal {allocated / 2**20:.1f} MiB, local {local_allocated / 2**20:.1f} MiB")
    assert abs(allocated - local_allocated) < 8 << 20, (allocated, local_allocated)
    # Independent checks of the output, as for the local executor.
    assert "No problems found" in sh("sgdisk", "-v", raw).stdout
    table = gpt.read_table(raw)
    assert table.disk_sectors == 12 * 2097152
    state, oem = table.partition(1), table.partition(8)
    cfg = grub.read_grub_cfg(raw, table.partition(12).first * 512)
    entries = grub.read_dm(cfg)
    vroot_b, oemroot = entries[1][0], entries[0][1]
    assert verity_verify(raw, table.partition(5), vroot_b).returncode == 0
    verified = verity_verify(raw, oem, oemroot)
    assert verified.returncode == 0, verified.stderr
    s, o = state.first * 512, oem.first * 512
    assert cat(raw, s, "/var_overlay/lib/hello") == "hello from the build\n"
    assert cat(raw, s, "/hello") == "kept on STATE\n"
    assert cat(raw, o, "/hello") == "in the OEM\n"
    assert cat(raw, s, "/var_overlay/lib/greeting") == "hi [a,b] from /var/lib/.cos-customizer/user\n"
    assert not exists(raw, s, "/var_overlay/lib/.cos-customizer")
    ext.check(raw, s)
    ext.check(raw, o)
    # The local executor's build of the same inputs: same table, same files, same grub.cfg but for hashes.
    local_table = gpt.read_table(local)
    assert _layout(table) == _layout(local_table)
    local_cfg = grub.read_grub_cfg(local, local_table.partition(12).first * 512)
    assert _hexless(cfg) == _hexless(local_cfg)
    ls, lo = local_table.partition(1).first * 512, local_table.partition(8).first * 512
    for offset, local_offset, name in ((s, ls, "/var_overlay/lib/hello"), (s, ls, "/hello"), (o, lo, "/hello"),
                                       (s, ls, "/var_overlay/lib/greeting")):  # fmt: skip
        assert cat(raw, offset, name) == cat(local, local_offset, name), name


def test_the_rehearsed_output_passes_cos_checks_from_inside(
    rehearsed: tuple[int, str, str, Path], tmp_path: Path
) -> None:
    """The same checks as the local build's in test_boot_outputs, from inside the booted output."""
    code, _, err, raw = rehearsed
    assert code == 0, err[-3000:]
    assert "BuildStatus: Loaded image: ubuntu:latest" in err  # the preload VM's docker loaded it
    user_data = tmp_path / "checks.cfg"
    user_data.write_text(boot_outputs.CHECKS)
    before = data_digest(raw)
    boot_outputs.passed(boot_outputs.boot(raw, user_data))
    assert data_digest(raw) == before


def test_the_provisioners_view_from_inside(rehearsed: tuple[int, str, str, Path]) -> None:
    code, _, err, _ = rehearsed
    assert code == 0, err[-3000:]
    env = [line.split("BuildStatus: env: ", 1)[1] for line in err.splitlines() if "BuildStatus: env: " in line]
    names = {line.split("=", 1)[0] for line in env}
    assert {"GREETING", "LIST", "HOME", "PATH"} <= names, env
    assert not [n for n in names if n == "LD_LIBRARY_PATH" or n.startswith(("_PYI_", "STATICX_"))], env
    assert "BuildStatus: tmp: noexec" in err
    assert "BuildStatus: home: /root writable" in err
    mounts = [line.split("BuildStatus: mountinfo: ", 1)[1] for line in err.splitlines() if "mountinfo: " in line]
    tmp = [line for line in mounts if line.split()[4] == "/tmp"]
    assert tmp and "noexec" in tmp[0].split()[5], mounts
    root = [line for line in mounts if line.split()[4] == "/"]
    assert root and root[0].split()[5].startswith("ro"), mounts
    # The build context came from the GCS server with the metadata token; without it the server refuses.
    assert "BuildStatus: Unpacking build context user from gs://cos-customizer-local/cos-customizer/" in err
    assert "BuildStatus: anonymous GCS read: HTTP 401" in err
    # Each reboot is reported with the reason the provisioner gave for it.
    reasons = re.findall(r"preload-vm: the guest rebooted \(QEMU: guest-reset\): (.*)", err)
    assert reasons == ["the root moves to ROOT-B", "ROOT-A was shrunk", "partitions are relocated at shutdown"], err


def test_a_failing_script_fails_the_rehearsal_and_leaves_nothing(tmp_path: Path, bootable_raw_dm_mod: Path) -> None:
    steps = [["run-script", "-script=fail.sh"]]
    started = time.time()
    code, out, err, output = _rehearse(tmp_path, bootable_raw_dm_mod, steps, ["-timeout=15m"])
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("cos-customizer: error: the rehearsed build failed in workflow step wait-preload-finished")
    assert "BuildFailed: step 0 (RunScript)" in last, last
    assert "BuildStatus: about to fail" in err
    assert out == ""
    assert not output.exists()
    assert _qemu_processes(str(tmp_path)) == []
    assert list((tmp_path / "t").iterdir()) == []  # the working directory and the disks: gone
    assert len(str(tmp_path / "t")) > rehearsal.SOCKET_BASE_MAX  # so the sockets went to /tmp: gone too
    assert not [p for p in Path("/tmp").glob("cos-qemu.*") if p.stat().st_mtime >= started]
    assert leaks(tmp_path) == ([], [])
    assert not (tmp_path / "ws").exists()


def test_a_step_past_timeout_stops_the_rehearsal_with_daisys_words(tmp_path: Path, bootable_raw_dm_mod: Path) -> None:
    """-timeout is daisy's -default_timeout: the step that outlives it fails with daisy's own error (step.go,
    getTimeoutError), the rehearsal cleans up as daisy does, and nothing is left."""
    code, out, err, output = _rehearse(tmp_path, bootable_raw_dm_mod, [["run-script", "-script=slow.sh"]],
                                       ["-timeout=30s"])  # fmt: skip
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"cos-customizer: error: the rehearsed build failed in workflow step ([a-z-]+) \(\w+\): "
        r'step "\1" did not complete within the specified timeout of 30s',
        last,
    ), last
    assert "ran past cos-customizer's own bound" not in err
    assert out == ""
    assert not output.exists()
    assert _qemu_processes(str(tmp_path)) == []
    assert list((tmp_path / "t").iterdir()) == []
    assert leaks(tmp_path) == ([], [])


# -- other local users (issue 20, point 4)

CONTEXT_MEDIA = "/storage/v1/b/cos-customizer-local/o/cos-customizer%2Fuser_build_context.tar?alt=media"


def _through_guestfwd(argv: list[str], guest: str, request: bytes) -> bytes:
    """What the guest gets for `request` sent to `guest` (ADDRESS:PORT): QEMU's guestfwd command for it, from the
    instance's real argv, run as QEMU runs it (split on blanks, no shell) with the guest's bytes on its stdin."""
    netdev = argv[argv.index("-netdev") + 1]
    commands = dict(part.split("-cmd:", 1) for part in netdev.split(",guestfwd=")[1:])
    with subprocess.Popen(shlex.split(commands[f"tcp:{guest}"]), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(request)
        proc.stdin.flush()
        answer = proc.stdout.read()  # the server closes after its answer (HTTP/1.0); the guest's side stays open
        proc.stdin.close()
    return answer


def test_other_local_users_reach_none_of_the_rehearsals_services(
    tmp_path: Path, sample_raw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real rehearsal up to its first boot: then `nobody` scans /proc/net and asks every listening socket of
    this process for the token, the user-data and the build context; and the guest's path gets all three."""
    for tool in ("qemu-system-x86_64", "socat"):
        if not sh("which", tool, check=False).stdout.strip():
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    secret = f"build secret {uuid.uuid4().hex}"
    (tmp_path / "context").mkdir()
    (tmp_path / "context" / "secret.txt").write_text(secret)
    (tmp_path / "context" / "ok.sh").write_text("true\n")
    source = tmp_path / "source.raw"
    sh("cp", "--sparse=always", sample_raw, source)
    binary = tmp_path / "provisioner"
    binary.write_bytes(b"\x7fELF stand-in: never booted here\n")
    env = {"HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "ws"), "PATH": os.environ["PATH"],
           rehearsal.ACCEL_ENV: "tcg"}  # fmt: skip
    assert main(["start-image-build", f"-build-context={tmp_path / 'context'}", f"-image-file={source}"], env) == 0
    assert main(["run-script", "-script=ok.sh"], env) == 0
    seen: dict[str, Any] = {}
    before = set(own_socket_inodes())  # other tests' servers in this process (a session's emulators) are not asked

    def first_boot(machine: qemu_instances.Machine) -> None:
        metadata = machine.instance.metadata
        seen["token"], seen["user-data"] = metadata.token, metadata.attributes()["user-data"]
        seen["loot"] = attack(CONTEXT_MEDIA, [inode for inode in own_socket_inodes() if inode not in before])
        argv = machine._argv(BootChoice(0, "t", "/k", ""), machine.directory / "kernel", None)
        seen["sockets"] = [Path(arg.rsplit("UNIX-CONNECT:", 1)[1]) for arg in argv[argv.index("-netdev") + 1]
                           .split(",guestfwd=")[1:]]  # fmt: skip
        seen["modes"] = [stat.S_IMODE(path.parent.stat().st_mode) for path in seen["sockets"]]
        flavor = b"Metadata-Flavor: Google\r\n\r\n"
        seen["guest token"] = _through_guestfwd(
            argv,
            "169.254.169.254:80",
            b"GET /computeMetadata/v1/instance/service-accounts/default/token HTTP/1.1\r\nHost: m\r\n" + flavor,
        )
        seen["guest user-data"] = _through_guestfwd(
            argv,
            "169.254.169.254:80",
            b"GET /computeMetadata/v1/instance/attributes/user-data HTTP/1.1\r\nHost: m\r\n" + flavor,
        )
        bearer = f"Authorization: Bearer {metadata.token}\r\n\r\n".encode()
        seen["guest context"] = _through_guestfwd(
            argv, f"{rehearsal.GCS_ADDRESS}:80", f"GET {CONTEXT_MEDIA} HTTP/1.1\r\nHost: g\r\n".encode() + bearer
        )
        raise qemu_instances.InstanceError("the test stops here: no guest boots")  # fmt: skip

    monkeypatch.setattr(qemu_instances.Machine, "start", first_boot)
    code = main(["finish-image-build", "-executor=qemu", f"-output={tmp_path / 'out.raw'}",
                 f"-provisioner-binary={binary}", "-timeout=10m"], env)  # fmt: skip
    assert code == 1 and "loot" in seen, seen
    loot = seen["loot"]
    # nobody saw this process's listening sockets in /proc/net, and got nothing from any of them.
    assert loot.targets, loot
    assert loot.leaked(seen["token"], seen["user-data"], secret) == []
    assert not [target for target in loot.targets if target.startswith("tcp ")], loot.targets
    metadata_socket, gcs_socket = seen["sockets"]
    assert unreachable(loot, metadata_socket) and unreachable(loot, gcs_socket), loot.answers
    assert seen["modes"] == [0o700, 0o700]
    # The guest's path, QEMU's own guestfwd commands, gets all three.
    assert b"200 OK" in seen["guest token"].split(b"\r\n", 1)[0]
    assert json.loads(seen["guest token"].split(b"\r\n\r\n", 1)[1])["access_token"] == seen["token"]
    assert seen["guest user-data"].split(b"\r\n\r\n", 1)[1].decode() == seen["user-data"]
    assert seen["user-data"].startswith("#cloud-config")
    assert b"200 OK" in seen["guest context"].split(b"\r\n", 1)[0] and secret.encode() in seen["guest context"]
    # The servers' private directories went with the run.
    assert not metadata_socket.parent.exists() and not gcs_socket.parent.exists()
