"""A run-script can change only the image: each escape route tried from inside a script, the host checked after.

Real local builds of the sample image (as root), with a static C probe (tests/sandbox_probe.c, built here with
gcc -static) for what bash cannot do; every check looks at the host side, not only at what the script saw.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.executors.local.runtime import large_tmpfs_size

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not privilege.can_mount(), reason="needs root for loop devices, mounts and namespaces"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the probe"),
    pytest.mark.skipif(shutil.which("slirp4netns") is None, reason="needs slirp4netns (scripts/setup installs it)"),
]

PROBE_SOURCE = Path(__file__).parents[1] / "sandbox_probe.c"
BLOCK_DEVICES = [f"/dev/loop{n}" for n in range(8)] + ["/dev/sda", "/dev/vda", "/dev/nvme0n1", "/dev/loop-control"]
SYS_FILE = "/sys/module/printk/parameters/time"  # written with the value it has: harmless if it ever got through

PROBE_SCRIPT = r"""
cp probe /mnt/disks/probe && P=/mnt/disks/probe   # the build context is on /var, which is noexec
say() { echo "RESULT $1 $2"; }
$P chroot-escape "$HOST_MARKER"
$P open $BLOCK_DEVICES
blocks=""; for f in /dev/* /dev/*/*; do [ -b "$f" ] && blocks="$blocks $f"; done; say block-nodes "${blocks:-none}"
say dev "$(cd /dev && echo *)"
$P mknod
$P modules
$P mounts
$P cgroupns "$VICTIM_CGROUP"
if (echo "$SYS_VALUE" > "$SYS_FILE") 2>/dev/null; then say sys-write ok; else say sys-write refused; fi
if (echo 1 > /proc/sys/kernel/sysrq) 2>/dev/null; then say proc-sys-write ok; else say proc-sys-write refused; fi
say cgroup-dir "$(ls -A /sys/fs/cgroup | tr '\n' ' ')empty"
if kill -9 "$VICTIM" 2>/dev/null; then say kill ok; else say kill refused; fi
moved=no; for f in /sys/fs/cgroup/*/cgroup.procs /sys/fs/cgroup/cgroup.procs; do
  [ -e "$f" ] && (echo "$VICTIM" > "$f") 2>/dev/null && moved=yes
done; say cgroup-procs "$moved"
if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then say loopback-127 connected; else say loopback-127 refused; fi
if (exec 3<>/dev/tcp/10.0.2.2/$PORT) 2>/dev/null; then say loopback-gw connected; else say loopback-gw refused; fi
set -- $(df -k /tmp | tail -1); say tmp-size "$2"
if head -c $(( (TMP_CAP_MIB + 16) * 1048576 )) /dev/zero > /tmp/fill 2>/tmp/fill.err; then say tmp-fill ok; else say tmp-fill "$(grep -o 'No space left on device' /tmp/fill.err)"; fi
rm -f /tmp/fill
say env "LD_PRELOAD=$LD_PRELOAD PATH=$PATH"
say caps "$(grep CapBnd /proc/self/status | cut -f2)"
printf 'RESULT terminal x\033[2J\r\a\tx\n'  # what a terminal would act on, in a script's output
say nnp "$(grep NoNewPrivs /proc/self/status | cut -f2)"
say pid1 "$(cat /proc/1/comm)"
"""


@dataclass(frozen=True)
class Probe:
    binary: Path
    preload: Path  # a shared object that leaves a marker on the host when any host program loads it
    evil: Path  # a PATH directory whose programs leave a marker on the host when run


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Probe:
    tmp = tmp_path_factory.mktemp("probe")
    binary = tmp / "probe"
    subprocess.run(["gcc", "-static", "-O1", "-o", binary, PROBE_SOURCE], check=True)
    marker = tmp / "preloaded"
    source = tmp / "preload.c"
    source.write_text(
        "#include <fcntl.h>\n#include <unistd.h>\n"
        f'__attribute__((constructor)) static void mark(void) {{ close(open("{marker}", O_CREAT | O_WRONLY, 0644)); }}\n'
    )
    preload = tmp / "preload.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", preload, source], check=True)
    evil = tmp / "evil"
    evil.mkdir()
    for name in ("unshare", "nsenter", "python3", "slirp4netns", "mount", "umount", "tar", "bash", "env"):
        (evil / name).write_text(f"#!/bin/sh\ntouch {tmp}/evil-ran-{name}\nexit 1\n")
        (evil / name).chmod(0o755)
    return Probe(binary, preload, evil)


def _markers(probe: Probe) -> list[Path]:
    return sorted(p for p in probe.binary.parent.iterdir() if p.name == "preloaded" or p.name.startswith("evil-ran"))


class Listener:
    """A TCP listener on the host's 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


VICTIM_CGROUP = f"cos-test-victim-{os.getpid()}"


def host_cgroups(pid: int) -> list[Path]:
    """A cgroup of this machine's beside the test's own one (so beside the build's too), in the cgroup2 tree and
    the v1 name=systemd and memory hierarchies, holding the process `pid`: what a script must neither see nor kill."""
    mine = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())
    made: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[fields.index("-") + 3].split(",")
        key = "" if fstype == "cgroup2" else next((o for o in options if o in ("name=systemd", "memory")), None)
        if fstype not in ("cgroup", "cgroup2") or key is None or key not in mine or fields[3] != "/":
            continue
        path = Path(fields[4]) / mine.pop(key).lstrip("/") / VICTIM_CGROUP
        path.mkdir()
        made.append(path)
        (path / "cgroup.procs").write_text(f"{pid}\n")
    return made


@dataclass(frozen=True)
class Run:
    code: int
    err: str
    results: dict[str, str]
    host_marker: Path
    victim_alive: bool
    dev_before: list[str]
    dev_after: list[str]
    accepted: int
    markers: list[Path]
    tmp: Path


def _tmp_cap_mib() -> int:
    return large_tmpfs_size() >> 20


def build(tmp: Path, sample: Path, probe: Probe, *finish: str) -> Run:
    context = tmp / "context"
    context.mkdir()
    shutil.copy(probe.binary, context / "probe")
    (context / "probe.sh").write_text(PROBE_SCRIPT)
    source = tmp / "source.raw"
    subprocess.run(["cp", "--sparse=always", sample, source], check=True)
    env = {**os.environ, "HOME": str(tmp), "COS_CUSTOMIZER_WORKDIR": str(tmp / "ws")}
    host_marker = tmp / "escaped"
    victim = subprocess.Popen(["sleep", "600"])
    victim_cgroups = host_cgroups(victim.pid)
    listener = Listener()
    dev_before = sorted(os.listdir("/dev"))
    try:
        script_env = [
            f"VICTIM_CGROUP={VICTIM_CGROUP}",
            f"HOST_MARKER={host_marker}",
            f"BLOCK_DEVICES={' '.join(BLOCK_DEVICES)}",
            f"SYS_FILE={SYS_FILE}",
            f"SYS_VALUE={Path(SYS_FILE).read_text().strip()}",
            f"VICTIM={victim.pid}",
            f"PORT={listener.port}",
            f"TMP_CAP_MIB={_tmp_cap_mib()}",
            f"LD_PRELOAD={probe.preload}",
            f"PATH={probe.evil}:/usr/sbin:/usr/bin:/sbin:/bin",
        ]
        steps = [
            ["start-image-build", f"-build-context={context}", f"-image-file={source}"],
            ["run-script", "-script=probe.sh", *(f"-env={item}" for item in script_env)],
            ["finish-image-build", f"-output={tmp / 'out.raw'}", *finish],
        ]
        result = subprocess.CompletedProcess[str]([], 0, "", "")
        for step in steps:
            result = subprocess.run(
                [sys.executable, "-m", "cos_customizer", *step], env=env, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0 or step[0] == "finish-image-build", result.stderr
        alive = victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
        for path in victim_cgroups:
            path.rmdir()
        listener.close()
    results = dict(re.findall(r"\] RESULT (\S+) ?(.*)$", result.stderr, re.MULTILINE))
    return Run(
        code=result.returncode,
        err=result.stderr,
        results=results,
        host_marker=host_marker,
        victim_alive=alive,
        dev_before=dev_before,
        dev_after=sorted(os.listdir("/dev")),
        accepted=listener.accepted,
        markers=_markers(probe),
        tmp=tmp,
    )


@pytest.fixture(scope="module")
def confined(tmp_path_factory: pytest.TempPathFactory, sample_raw: Path, probe: Probe) -> Iterator[Run]:
    yield build(tmp_path_factory.mktemp("confined"), sample_raw, probe)


@pytest.fixture(scope="module")
def with_loopback(tmp_path_factory: pytest.TempPathFactory, sample_raw: Path, probe: Probe) -> Iterator[Run]:
    yield build(tmp_path_factory.mktemp("loopback"), sample_raw, probe, "-allow-host-loopback")


def test_the_probe_ran(confined: Run) -> None:
    assert confined.code == 0, confined.err
    assert confined.results["pid1"] == "bash"
    assert len(confined.results) > 30, confined.err


def test_chroot_escape_stays_in_the_image(confined: Run) -> None:
    # the nested-chroot climb ends at the image's root: the host path does not exist there
    assert confined.results["chroot-escape-write"] == "ENOENT"
    assert not confined.host_marker.exists()


def test_no_block_device_of_the_host(confined: Run) -> None:
    for device in BLOCK_DEVICES:
        assert confined.results[f"open:{device}"] == "ENOENT", device
    assert confined.results["block-nodes"] == "none"
    assert confined.results["dev"] == "core fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"


def test_mknod_is_refused_and_the_host_dev_unchanged(confined: Run) -> None:
    assert confined.results["mknod-blk-tmp"] == "EPERM"
    assert confined.results["mknod-blk-dev"] == "EPERM"
    assert confined.results["mknod-chr-dev"] == "EPERM"

    def not_loop(names: list[str]) -> list[str]:  # other builds on this machine may attach loop devices meanwhile
        return [name for name in names if not name.startswith("loop")]

    assert not_loop(confined.dev_after) == not_loop(confined.dev_before)


def test_sys_is_read_only_and_holds_no_cgroup_tree(confined: Run) -> None:
    assert confined.results["sys-write"] == "refused"
    assert confined.results["proc-sys-write"] == "refused"
    assert confined.results["cgroup-dir"] == "empty"
    assert confined.results["remount-sys-rw"] == "EPERM"
    assert confined.results["umount-proc-sys"] == "EINVAL"  # locked: cannot be peeled off
    assert confined.results["remount-usr-rw"] == "EPERM"


def test_no_file_system_of_the_host_can_be_mounted(confined: Run) -> None:
    for fs in ("devtmpfs", "cgroup2", "cgroup-freezer", "sysfs-rw"):
        assert confined.results[f"mount-{fs}"] == "EPERM", fs
    assert confined.results["mount-tmpfs"] == "ok"  # mounts inside the stage still work


def test_host_processes_cannot_be_killed(confined: Run) -> None:
    assert confined.results["kill"] == "refused"
    assert confined.results["cgroup-procs"] == "no"
    assert confined.victim_alive


def test_a_cgroup_namespace_of_the_script_shows_no_cgroup_of_the_host(confined: Run) -> None:
    # A script may make a cgroup namespace and mount cgroup file systems in it (it is root of its own user
    # namespace), but the namespace is rooted at the build's own cgroups: the host's cgroup beside them
    # (holding a process of this test) is not there, so it cannot be killed through cgroup.kill.
    assert confined.results["unshare-cgroupns"] == "ok"
    for index in range(3):
        assert confined.results[f"sees-victim-{index}"] == "ENOENT", confined.err
    assert confined.results["cgroup-kill"] == "ENOENT"
    assert confined.victim_alive


def test_a_scripts_output_cannot_drive_the_terminal(confined: Run) -> None:
    assert confined.results["terminal"] == "x\\x1b[2J\\r\\x07\tx"  # escaped, but the tab
    assert not any(char in confined.err for char in "\x1b\r\x07")


def test_no_kernel_module_can_be_loaded(confined: Run, probe: Probe) -> None:
    # the host's root, given the same empty module, gets EINVAL or ENOEXEC; a kernel built without module
    # support (as some VMs' are) says ENOSYS to everyone, and the bounding set below is the proof there
    host = subprocess.run([probe.binary, "modules"], capture_output=True, text=True, check=True).stdout
    no_modules = "RESULT finit_module ENOSYS" in host
    assert confined.results["finit_module"] == ("ENOSYS" if no_modules else "EPERM")
    assert confined.results["init_module"] == ("ENOSYS" if no_modules else "EPERM")
    bounding = int(confined.results["caps"], 16)
    for number in (16, 17, 22, 25, 27):  # SYS_MODULE, SYS_RAWIO, SYS_BOOT, SYS_TIME, MKNOD
        assert not bounding & (1 << number), number
    assert bounding & (1 << 21)  # CAP_SYS_ADMIN kept (it counts only in the sandbox's user namespace)
    assert confined.results["nnp"] == "1"


def test_host_loopback_is_refused_by_default(confined: Run) -> None:
    assert confined.results["loopback-127"] == "refused"
    assert confined.results["loopback-gw"] == "refused"
    assert confined.accepted == 0


def test_host_loopback_with_the_flag(with_loopback: Run) -> None:
    assert with_loopback.code == 0, with_loopback.err
    assert with_loopback.results["loopback-127"] == "connected"  # forwarded to the host's, same address
    assert with_loopback.results["loopback-gw"] == "connected"
    assert with_loopback.accepted == 2  # one connection by each address


def test_tmp_is_capped(confined: Run) -> None:
    assert int(confined.results["tmp-size"]) == _tmp_cap_mib() * 1024
    assert confined.results["tmp-fill"] == "No space left on device"


def test_env_reaches_only_the_script(confined: Run, probe: Probe) -> None:
    # the build worked although PATH starts with a directory of fake host tools and LD_PRELOAD names a
    # library that marks the host when loaded: no host-side process ran either
    assert confined.markers == []
    assert confined.results["env"] == f"LD_PRELOAD={probe.preload} PATH={probe.evil}:/usr/sbin:/usr/bin:/sbin:/bin"


def test_nothing_left_behind(confined: Run, with_loopback: Run) -> None:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout.splitlines()
    for run in (confined, with_loopback):
        assert run.code == 0
        assert [line for line in ps if str(run.tmp) in line] == []  # slirp4netns, the sandbox helper
        assert [line for line in Path("/proc/mounts").read_text().splitlines() if str(run.tmp) in line] == []


def test_a_stopped_build_takes_the_script_with_it(tmp_path: Path, sample_raw: Path) -> None:
    """SIGTERM to the build while a script and its child sleep: no process of the sandbox survives."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "s.sh").write_text("sleep 3137 & echo started; sleep 3138\n")
    source = tmp_path / "source.raw"
    subprocess.run(["cp", "--sparse=always", sample_raw, source], check=True)
    env = {**os.environ, "HOME": str(tmp_path), "COS_CUSTOMIZER_WORKDIR": str(tmp_path / "ws")}
    for step in (["start-image-build", f"-build-context={context}", f"-image-file={source}"],
                 ["run-script", "-script=s.sh"]):  # fmt: skip
        subprocess.run([sys.executable, "-m", "cos_customizer", *step], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cos_customizer", "finish-image-build", f"-output={tmp_path / 'out.raw'}"],
        env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "started" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = subprocess.run(["pgrep", "-f", "^sleep 313[78]$"], capture_output=True, text=True, check=False)
    assert left.stdout.split() == []
