"""`cos-customizer boot`: boot an image file as a GCE VM would and wait for a line on one of its serial ports.

The image (raw, qcow2 or GCE `.tar.gz`) is booted with the qemu executor's own machinery, through a
tiny Daisy workflow run by `daisy_local`, as a GCE acceptance test boots an image:

- `disk`: CreateDisks from the image (`Resources`: a sparse raw working copy in a private
  directory, so **the image file is only ever read**; the directory goes when the run ends);
- `run`: CreateInstances with the metadata items (`user-data` among them), served by the
  instance's metadata server (`QemuInstances`: the kernel COS's GRUB would choose, virtio-scsi
  boot disk, SMBIOS saying Google, serial ports captured, KVM where a kernel runs under it, else TCG);
- `wait`: WaitForInstancesSignal on the chosen serial port with Daisy's `SerialOutput` semantics
  (`SuccessMatch`, `FailureMatch`, `StatusMatch`).

The metadata values reach the workflow as Daisy sources (`${SOURCE:name}`), so their text is never
read for `${...}` vars. Whatever ends the run (a match, the timeout, Ctrl-C, SIGTERM), Daisy's
cleanup stops QEMU and the servers and removes the private directories.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cos_customizer import images, runner
from cos_customizer.errors import CustomizerError, UsageError, shown
from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.executors.qemu import daisy as daisy_local
from cos_customizer.executors.qemu import loopback_http
from cos_customizer.executors.qemu.boot import BootChoice
from cos_customizer.executors.qemu.console import ESCAPE_NAME, Console
from cos_customizer.executors.qemu.daisy import StepContext, StepEvent
from cos_customizer.executors.qemu.instances import HUNG, Machine, QemuInstances
from cos_customizer.executors.qemu.rehearsal import ACCEL_ENV, INSTANCE_CPUS, INSTANCE_MEMORY_MB
from cos_customizer.executors.qemu.resources import Resources
from cos_customizer.images import ImageFormat

SERIAL_PORTS = (1, 2, 3, 4)  # GCE's serial ports: the guest's ttyS0..ttyS3
METADATA_KEY = re.compile(r"[a-zA-Z0-9_-]{1,128}")  # GCE's rule for a metadata key
METADATA_VALUE_MAX = 256 * 1024  # GCE's limit for one value (and daisy_local's for a source expansion)
INSTANCE = "vm"
TAIL_LINES = 10
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours and cursor moves in a console log
FAILURE_FOUND = "FailureMatch found: "  # how `QemuInstances` words a failure match


class GuestFailed(CustomizerError):
    """The guest said the failure match, stopped before a match, or did not match in time (exit 1)."""


@dataclasses.dataclass(frozen=True)
class BootJob:
    """What to boot and what to wait for."""

    image: Path
    metadata: tuple[tuple[str, str], ...] = ()  # instance attributes (user-data included), in order
    port: int = 1
    success: str = ""
    failures: tuple[str, ...] = ()
    status: str = ""
    timeout: float = 600.0  # seconds
    hang_timeout: float = 300.0  # seconds of no serial output and no disk I/O: the guest hangs (0: never)
    accel: str = ""  # "kvm", "tcg", or "" for KVM where a kernel runs under it
    memory_mb: int = INSTANCE_MEMORY_MB
    cpus: int = INSTANCE_CPUS

    @property
    def console(self) -> bool:
        """No success match: the guest's serial console on this terminal until it powers off (or Ctrl-])."""
        return not self.success


@dataclasses.dataclass(frozen=True)
class BootResult:
    line: str  # the line the success match was found in
    boots: int
    accel: str
    seconds: float
    escaped: bool = False  # console mode: stopped by the escape key (else the guest powered off)


def check_metadata_key(key: str) -> None:
    if not METADATA_KEY.fullmatch(key):
        raise UsageError(f"metadata key {shown(key)}: a key is 1 to 128 letters, digits, '-' and '_' (GCE's rule)")


def check_metadata_value(key: str, value: str) -> None:
    if len(value.encode("utf-8", "surrogateescape")) > METADATA_VALUE_MAX:
        raise UsageError(f"metadata {shown(key)}: a value is at most 256 KiB on GCE")


def read_metadata_file(key: str, path: Path) -> str:
    """The text of a metadata file (`-user-data`, `-metadata-from-file`), refused in one line when unusable."""
    if not path.is_file():
        what = "does not exist" if not os.path.lexists(path) else "is not a regular file"
        raise UsageError(f"metadata {shown(key)}: {shown(path)} {what}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"metadata {shown(key)}: cannot read {shown(path)}: {err.strerror}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"metadata {shown(key)}: {shown(path)} is not UTF-8 text") from None
    check_metadata_value(key, text)
    return text


def check_image(path: Path) -> None:
    """Refuse, before anything runs, an image path that is not a regular file holding a GPT disk."""
    what = images.kind(path)
    if what == images.MISSING:
        raise UsageError(f"-image-file: {shown(path)} does not exist")
    if what != images.REGULAR:
        raise UsageError(f"-image-file: {shown(path)} is {what}, not a disk image file")
    try:
        images.read_source_table(path)  # the head only: a file that is no GPT disk is refused before any copy
    except OSError as err:
        raise UsageError(f"-image-file: cannot read {shown(path)}: {err.strerror}") from err
    except CustomizerError as err:
        raise UsageError(f"-image-file: {err}") from err


def document(job: BootJob, files: Mapping[str, Path]) -> dict[str, Any]:
    """The workflow; `files` maps each metadata key to the file holding its value (a Daisy source each)."""
    names = {key: f"metadata-{index}" for index, key in enumerate(files)}
    serial: dict[str, Any] = {"Port": job.port, "SuccessMatch": job.success}
    if job.failures:
        serial["FailureMatch"] = list(job.failures)
    if job.status:
        serial["StatusMatch"] = job.status
    wait: dict[str, Any] = (
        {"Name": INSTANCE, "Stopped": True} if job.console else {"Name": INSTANCE, "SerialOutput": serial}
    )
    timeout = f"{max(1, int(job.timeout))}s"
    return {
        "Name": "cos-customizer-boot",
        "Sources": {names[key]: str(path) for key, path in files.items()},
        "Steps": {
            "disk": {"CreateDisks": [{"Name": "boot-disk", "SourceImage": "image"}], "Timeout": timeout},
            "run": {
                "CreateInstances": [
                    {
                        "Name": INSTANCE,
                        "Disks": [{"Source": "boot-disk"}],
                        "Metadata": {key: f"${{SOURCE:{name}}}" for key, name in names.items()},
                    }
                ],
                "Timeout": timeout,
            },
            "wait": {"WaitForInstancesSignal": [wait], "Timeout": timeout},
        },
        "Dependencies": {"run": ["disk"], "wait": ["run"]},
    }


class _Watch:
    """Reports the run as it goes and keeps, before the cleanup removes them, the serial logs' last lines."""

    def __init__(self, instances: QemuInstances, port: int, say: Callable[[str], None]) -> None:
        self.instances, self.port, self.say = instances, port, say
        self.console = ""  # the console's last lines (serial port 1)
        self.watched = ""  # the watched port's last lines, when it is not the console
        self.failure = ""  # the line a failure match was found in
        self.last = ""  # the last status line printed (a success line is reported again as a status)

    def event(self, event: StepEvent) -> None:
        if event.kind == "status" and event.detail != self.last:
            self.last = event.detail
            self.say(f"  {event.detail}")
        elif event.kind == "failed" and FAILURE_FOUND in event.detail:
            self.failure = event.detail.split(FAILURE_FOUND, 1)[1]

    def boot(self, machine: Machine, choice: BootChoice) -> None:
        if machine.boots == 1:
            self.say(f"boot 1 ({machine.accel.upper()}): {choice.title} ({choice.kernel})")
        else:
            why = machine.reasons[-1] if machine.reasons else "?"
            self.say(f"the guest rebooted (QEMU: {why}); boot {machine.boots}: {choice.title} ({choice.kernel})")

    def keep_tails(self) -> None:
        machine = self.instances.machines.get(INSTANCE)
        if machine is None:
            return
        self.console = _tail(machine.console)
        if self.port != 1:
            self.watched = _tail(machine.serial_log(self.port))

    def wrap(self, handler: daisy_local.Handler) -> daisy_local.Handler:
        def wait(step: str, body: Any, context: StepContext) -> None:
            try:
                handler(step, body, context)
            finally:  # the instance's directory, its logs with it, goes with the cleanup
                self.keep_tails()

        return wait


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 64 * 1024))
            text = file.read().decode(errors="replace")
    except OSError:
        return ""
    text = TERMINAL_CODES.sub("", text)
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def _accel(job: BootJob, environ: Mapping[str, str]) -> str:
    accel = job.accel or environ.get(ACCEL_ENV, "")
    if accel not in ("", "kvm", "tcg"):
        raise UsageError(f"${ACCEL_ENV}={accel}: use kvm or tcg, or leave it unset")
    return accel


def run(job: BootJob, environ: Mapping[str, str], say: Callable[[str], None]) -> BootResult:
    """Boot `job.image` and wait for the success match; `GuestFailed` for anything else the guest did."""
    check_image(job.image)
    accel = _accel(job, environ)
    for tool, package in ((qemu_boot.QEMU, "qemu-system-x86"), ("socat", "socat"), ("mcopy", "mtools")):
        runner.require_tool(tool, package)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="cos-customizer-boot.") as tmp,
        tempfile.TemporaryDirectory(prefix="cos-boot.", dir=loopback_http.socket_base()) as run_dir,
    ):
        work = Path(tmp)
        files: dict[str, Path] = {}
        for index, (key, value) in enumerate(job.metadata):
            files[key] = work / f"metadata-{index}"
            files[key].write_text(value)
        (work / "resources").mkdir()
        with Resources(
            work / "resources",
            gcs_path="gs://cos-customizer-local/boot",
            output_path=work / "no-output.raw",
            output_format=ImageFormat.RAW,
            source_images={"image": job.image},
            sockets=Path(run_dir),
        ) as resources:
            wf = daisy_local.load(document(job, files), {}, workflow_dir=work, autovars=resources.autovars())
            instances = QemuInstances(resources, accel=accel or None, memory_mb=job.memory_mb, cpus=job.cpus,
                                      rundir=Path(run_dir), serial_ports=(job.port,), interactive=job.console,
                                      hang_after=0.0 if job.console else job.hang_timeout)  # fmt: skip
            watch = _Watch(instances, job.port, say)
            terminal = Console(lambda: instances.machines[INSTANCE].stop()) if job.console else None
            instances.on_boot = watch.boot if terminal is None else _attached(watch.boot, terminal)
            handlers = {**resources.handlers(), **instances.handlers()}
            handlers["WaitForInstancesSignal"] = watch.wrap(handlers["WaitForInstancesSignal"])
            success: list[str] = []

            def event(event: StepEvent) -> None:
                if event.kind == "status" and job.success and job.success in event.detail:
                    success.append(event.detail)
                watch.event(event)

            if terminal is None:
                say(f"Booting {job.image} (a working copy; the file itself is only read); waiting for serial port "
                    f"{job.port} to say {job.success!r}")  # fmt: skip
            else:
                say(f"Booting {job.image} (a working copy; the file itself is only read). Its serial console is on "
                    f"this terminal: {ESCAPE_NAME} stops the VM, and so does poweroff in the guest")  # fmt: skip
            try:
                daisy_local.run(wf, handlers, default_timeout=job.timeout, deadline=started + job.timeout,
                                on_event=event)  # fmt: skip
            except daisy_local.WorkflowError as err:
                raise _failed(job, err, watch) from err
            finally:
                if terminal is not None:
                    terminal.close()
            machine = instances.machines.get(INSTANCE)
            return BootResult(
                success[-1] if success else "",
                machine.boots if machine else 0,
                instances.accel,
                time.monotonic() - started,
                escaped=terminal is not None and terminal.escaped,
            )


def _attached(
    report: Callable[[Machine, BootChoice], None], terminal: Console
) -> Callable[[Machine, BootChoice], None]:
    """An on-boot callback that reports the boot, then relays this boot's console socket to the terminal."""

    def on_boot(machine: Machine, choice: BootChoice) -> None:
        report(machine, choice)
        terminal.attach(machine.console_socket, lambda: not machine.stopped.is_set())

    return on_boot


def _failed(job: BootJob, err: daisy_local.WorkflowError, watch: _Watch) -> CustomizerError:
    """The one-line error for a run that ended without the success match."""
    if watch.failure:
        return GuestFailed(f"serial port {job.port} matched -failure-match: {watch.failure}")
    reason = err.reason if isinstance(err, daisy_local.WorkflowStepFailed) else str(err)
    timed_out = isinstance(err, daisy_local.DeadlineExceeded) or "did not complete within" in reason
    tails = ""
    if watch.watched:
        tails += f"; serial port {job.port}'s last lines: {watch.watched}"
    if watch.console and (timed_out or "console's last lines" not in reason):
        tails += f"; the console's last lines: {watch.console}"
    if timed_out:
        return GuestFailed(f"serial port {job.port} did not say {job.success!r} within -timeout{tails}")
    if HUNG in reason:
        tails += "; if it may be that quiet, raise -hang-timeout (0 waits for -timeout)"
    if isinstance(err, daisy_local.WorkflowStepFailed) and err.step.name != "wait":
        return GuestFailed(f"the image did not boot: {reason}{tails}")
    return GuestFailed(f"{reason}{tails}")
