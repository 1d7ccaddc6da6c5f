"""`cos-customizer boot`: the bootable sample booted from its image file, checked from inside through serial port 2.

Under TCG (a boot to the check takes about 20 s here, 70 s with another QEMU beside it): a boot cut short by
-timeout, and one by SIGTERM; a build file's boot: section; the console mode on a pseudo-terminal. Each time
nothing is left (the private directories, QEMU and its helpers). Built outputs passing their checks and
unchanged, a `.tar.gz`, a failure line: test_boot_outputs.py.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import CLI
from tests.guest.conftest import left_in
from tests.guest.test_sample_bootable import bootable  # noqa: F401 - the fixture

# What a COS acceptance check does: a cloud-config whose script writes to serial port 2 (the guest's ttyS1).
USER_DATA = """#cloud-config
write_files:
- path: /tmp/check.sh
  permissions: '0644'
  content: |
    exec >/dev/ttyS1 2>&1
    echo "TestStatus: kernel $(uname -r), PID 1 $(cat /proc/1/comm)"
    if grep -q " /mnt/stateful_partition " /proc/mounts; then
      echo "TestStatus: STATE is mounted"
    else
      echo "TestFail: STATE is not mounted"
    fi
    echo "Test${RESULT}: the checks ran"
runcmd:
- [env, RESULT=%s, bash, /tmp/check.sh]
"""


def _boot(cli: CLI, image: Path, user_data: Path, *extra: str) -> tuple[int, str]:
    result = cli(
        "boot",
        f"-image-file={image}",
        f"-user-data={user_data}",
        "-serial-port=2",
        "-success-match=TestPass",
        "-failure-match=TestFail",
        "-status-match=TestStatus",
        "-timeout=8m",
        *extra,
    )
    return result.code, result.out + result.err


def test_timeout_and_sigterm_stop_the_guest_and_leave_nothing(
    cli: CLI,
    bootable: Path,  # noqa: F811 - the fixture
    private_tmp: Path,
    tmp_path: Path,
) -> None:
    silent = tmp_path / "user-data.yaml"
    silent.write_text("#cloud-config\n")
    code, output = _boot(cli, bootable, silent, "-timeout=20s")
    assert code == 1, output
    error = [line for line in output.splitlines() if line.startswith("cos-customizer: error:")]
    assert len(error) == 1, output
    assert error[0].startswith(
        "cos-customizer: error: serial port 2 did not say 'TestPass' within -timeout; the console's last lines: "
    )
    assert "\\x1b" not in error[0]  # the console's colours are not quoted
    assert left_in(private_tmp) == []

    log = tmp_path / "stderr"
    argv = [sys.executable, "-m", "cos_customizer", "boot", f"-image-file={bootable}", "-success-match=TestPass"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "TMPDIR": str(private_tmp)}
        )
    try:
        ends = time.monotonic() + 300
        while "boot 1 (" not in log.read_text() and proc.poll() is None and time.monotonic() < ends:
            time.sleep(0.2)
        time.sleep(2)  # QEMU and the metadata server run
        assert [path.name for path in private_tmp.iterdir()] != []  # the working copy is there meanwhile
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped by SIGTERM" in log.read_text()
    assert left_in(private_tmp) == []


def test_a_build_files_boot_checks_the_built_image_from_inside(
    cli: CLI,
    bootable: Path,  # noqa: F811 - the fixture
    private_tmp: Path,
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    (project / "ctx").mkdir(parents=True)
    (project / "ctx" / "preload.sh").write_text("echo built > /var/lib/built-by-script\n")
    check = USER_DATA.replace(
        'echo "Test${RESULT}: the checks ran"',
        "if grep -q built /mnt/stateful_partition/var_overlay/lib/built-by-script; then echo \"TestPass: the script's "
        'file"; else echo "TestFail: no file from the script"; fi',
    )
    (project / "check.yaml").write_text(check % "Pass")
    (project / "build.yaml").write_text(
        f"source: {{image-file: {bootable}, build-context: ctx}}\n"
        "steps:\n"
        "  - run-script: {script: preload.sh}\n"
        "finish: {output: custom.raw}\n"
        "boot:\n"
        "  user-data: check.yaml\n"
        "  serial-port: 2\n"
        "  success-match: TestPass\n"
        "  failure-match: TestFail\n"
        "  status-match: TestStatus\n"
        "  timeout: 8m\n"
    )
    result = cli("build", str(project / "build.yaml"))
    output = result.out + result.err
    assert result.code == 0, output
    assert "TestStatus: STATE is mounted" in output
    assert 'Serial port 2 said "TestPass: the script\'s file": the guest passed' in output
    assert (project / "custom.raw").exists()


class Terminal:
    """`cos-customizer boot` in console mode on a pseudo-terminal of its own, as from a user's terminal."""

    def __init__(self, image: Path, private: Path) -> None:
        self.master, slave = pty.openpty()
        self.before = termios.tcgetattr(self.master)
        argv = [sys.executable, "-m", "cos_customizer", "boot", f"-image-file={image}", "-timeout=8m"]
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     env={**os.environ, "TMPDIR": str(private)})  # fmt: skip
        os.close(slave)
        self.seen = b""
        self.after: list[object] = []

    def read_until(self, text: bytes, seconds: float = 300) -> bytes:
        ends = time.monotonic() + seconds
        while text not in self.seen:
            left = ends - time.monotonic()
            assert left > 0, f"{text!r} not seen; the terminal showed: {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the other end closed: the command ended
                    chunk = b""
                assert chunk or self.proc.poll() is None, f"{text!r} not seen: {self.seen[-2000:]!r}"
                self.seen += chunk
        return self.seen

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self) -> int:
        try:
            code = self.proc.wait(120)
            with contextlib.suppress(OSError):
                while chunk := os.read(self.master, 65536):
                    self.seen += chunk
            self.after = termios.tcgetattr(self.master)
            return code
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)


@pytest.mark.parametrize("how", ["poweroff", "escape"])
def test_the_console_logs_root_in_and_ends_on_poweroff_or_ctrl_bracket(
    bootable: Path,  # noqa: F811 - the fixture
    private_tmp: Path,
    how: str,
) -> None:
    terminal = Terminal(bootable, private_tmp)
    try:
        terminal.read_until(b"Ctrl-] stops the VM")
        if how == "poweroff":
            terminal.read_until(b"root@cos-sample:~# ")
            terminal.type(b"echo $((6 * 7))-from-inside\r")
            terminal.read_until(b"42-from-inside")
            terminal.type(b"poweroff\r")
        else:  # at once, while the kernel boots: Ctrl-] does not wait for the guest
            terminal.read_until(b"Linux version ")
            terminal.type(b"\x1d")
    finally:
        code = terminal.finish()
    said = terminal.seen.decode(errors="replace")
    assert code == 0, said
    why = "the guest powered off" if how == "poweroff" else "stopped by Ctrl-]"
    assert f"The VM is off ({why}; 1 boot(s) under TCG" in said, said
    assert terminal.after == terminal.before  # the terminal's modes are given back
    if how == "poweroff":
        assert "reboot: Power down" in said  # the guest's own clean shutdown, on its console
    assert left_in(private_tmp) == []
