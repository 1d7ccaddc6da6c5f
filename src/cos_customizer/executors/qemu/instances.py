"""The Daisy steps that run a guest: `CreateInstances` (QEMU processes) and `WaitForInstancesSignal`.

`QemuInstances(resources)` gives the two handlers (`handlers()`), for `daisy_local.run` next to
`Resources.handlers()`.

CreateInstances `[{Name, Disks: [{Source}], Metadata}]`: each instance is registered with
`Resources.add_instance` (its metadata server gets the workflow's metadata items, `user-data`
included) and booted as COS's GRUB would boot it (see `qemu_boot`): before *every* boot the boot
disk's GPT and EFI-SYSTEM `grub.cfg` are read again, `choose_kernel` picks the entry, and its
kernel (and initrd) are copied off the FAT with `mcopy` into the instance's private directory.
QEMU runs with `-no-reboot`, so a guest reboot ends the process; a supervisor thread then tells a
reboot from a power-off by QMP's `SHUTDOWN` event (QEMU 7.2: `reason` is `guest-reset` for a
reboot, `guest-shutdown` for a power-off; `host-qmp-quit`, `host-signal` ... when we stopped it)
and, for a reboot, plans again (the provisioner may have switched KERN-B's priority or edited
grub.cfg) and starts a fresh QEMU, counting boots. The events come from a second QMP monitor of
the supervisor's own, so the command connection (`Instance.qmp`, used by `ResizeDisks`) is never
read by two threads. Serial port 3 (the guest's /dev/ttyS2) and port 1 (its console) are files
opened in append mode, so their output accumulates across boots. QEMU gets
`runner.die_with_us()`, so it dies with the tool; the step's cleanup quits it through QMP, kills it
if it does not go, and removes the instance's directory.

The kernel chosen says which QEMU boots it (`qemu_boot.kernel_arch`): an arm64 one gets
`qemu-system-aarch64`'s virt machine under TCG (no KVM probe on another machine's kernel); `image_arch`
tells a rehearsal the source's machine the same way, before anything runs.

WaitForInstancesSignal `[{Name, SerialOutput: {Port, SuccessMatch, FailureMatch, StatusMatch}, Stopped}]`:
`SerialOutput` watches the port file with `daisy_local.SerialWatcher` (status lines go to
`context.status`, a failure match fails the step with the matched line, a success match ends the
wait); an instance that powers off for good before a match fails the step. `Stopped: true` waits
until the instance has powered off for good (not a reboot). Both honour the workflow's cancel and
the step's time left.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
import logging
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cos_customizer import images, runner
from cos_customizer.arch import Arch
from cos_customizer.disk import gpt, grub
from cos_customizer.errors import CustomizerError
from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.executors.qemu import daisy as daisy_local
from cos_customizer.executors.qemu.boot import BootChoice, InstanceSpec, Qmp, QmpError
from cos_customizer.executors.qemu.daisy import Handler, StepContext
from cos_customizer.executors.qemu.resources import Instance, Resources
from cos_customizer.units import format_duration

log = logging.getLogger(__name__)

QUIT_GRACE = 5.0  # seconds QEMU gets to leave after QMP `quit` before it is killed
POLL = 0.1  # seconds between looks at a serial port file
SERIAL_READ = 1 << 20  # bytes of a serial port file read at a time
RESET, POWEROFF = "guest-reset", "guest-shutdown"
HUNG = "the guest made no progress for"  # how `Stall` words a hung guest
LOOK = 1.0  # seconds between looks for a guest's signs of life (a QMP query-blockstats each)


class InstanceError(CustomizerError):
    """An instance cannot be booted, or stopped without the signal its wait asked for."""


_field = daisy_local.field
_entries = functools.partial(daisy_local.entries, error=InstanceError)


def plan_boot(boot_disk: Path, into: Path) -> tuple[BootChoice, Path, Path | None]:
    """The entry GRUB would boot from `boot_disk` now, and its kernel (and initrd) copied off the FAT into `into`."""
    table = gpt.read_table(boot_disk)
    efi = next((p for p in table.partitions if p.type_guid == gpt.EFI_SYSTEM), None)
    if efi is None:
        raise InstanceError(f"{boot_disk.name}: the boot disk has no EFI system partition")
    offset = efi.first * gpt.SECTOR
    choice = qemu_boot.choose_kernel(table, grub.read_grub_cfg(boot_disk, offset))
    mcopy = runner.require_tool("mcopy", "mtools")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

    def copy(path: str, name: str) -> Path:
        if path.startswith("("):
            raise InstanceError(f"grub.cfg entry {choice.title!r}: {path} is not on the EFI system partition")
        local = into / name
        local.unlink(missing_ok=True)
        result = runner.run([mcopy, "-n", "-i", f"{boot_disk}@@{offset}", f"::{path}", str(local)], env=env,
                            check=False)  # fmt: skip
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            raise InstanceError(
                f"grub.cfg entry {choice.title!r} boots {path}, which cannot be read from the EFI system "
                f"partition: {detail[-1] if detail else 'mcopy failed'}"
            )
        return local

    kernel = copy(choice.kernel, "kernel")
    initrd = copy(choice.initrd, "initrd") if choice.initrd else None
    return choice, kernel, initrd


def image_arch(image: Path, work: Path) -> Arch:
    """The machine an image file (raw, qcow2 or GCE .tar.gz) boots: that of the kernel its GPT and grub.cfg
    choose (`plan_boot`, `qemu_boot.kernel_arch`). A raw image is read in place; of another format, only
    the disk's head up to the end of EFI-SYSTEM is made raw, in `work` (a private directory), and removed."""
    if images.detect(image) is images.ImageFormat.RAW:
        _, kernel, _ = plan_boot(image, work)
    else:
        table = images.read_source_table(image)  # refuses what a working copy would refuse
        efi = next((p for p in table.partitions if p.type_guid == gpt.EFI_SYSTEM), None)
        if efi is None:
            raise InstanceError(f"{image.name}: the image has no EFI system partition")
        head = work / "head.raw"
        try:
            images.write_head(image, head, (efi.last + 1) * gpt.SECTOR)
            with open(head, "ab") as file:  # the backup GPT header, where the table says the disk ends
                file.truncate(table.disk_sectors * gpt.SECTOR)
            _, kernel, _ = plan_boot(head, work)
        finally:
            head.unlink(missing_ok=True)
    try:
        return qemu_boot.kernel_arch(kernel)
    finally:
        kernel.unlink(missing_ok=True)
        (work / "initrd").unlink(missing_ok=True)


@dataclasses.dataclass
class Machine:
    """One instance's QEMU processes, one per boot; `stopped` is set once it is off for good."""

    instance: Instance
    disks: tuple[Path, ...]
    directory: Path
    accel: str
    memory_mb: int
    cpus: int
    extra_append: str = ""  # added to every boot's kernel command line (after the grub.cfg entry's)
    forwards: tuple[tuple[str, int, Path], ...] = ()  # more guestfwd services, as InstanceSpec.forwards
    on_boot: Callable[[Machine, BootChoice], None] = lambda _machine, _choice: None
    serial_ports: tuple[int, ...] = ()  # ports recorded besides 1 and 3 (2, 4), each in `serial_log(port)`
    hang_after: float = 0.0  # seconds with no serial output and no disk I/O before a wait calls the guest hung
    interactive: bool = False  # serial port 1 is also a unix socket, `console_socket`, for a terminal to attach to
    boots: int = 0
    guest_seconds: float = 0.0  # how long QEMU ran, summed over the boots that ended
    reasons: list[str] = dataclasses.field(default_factory=list)  # the SHUTDOWN reason of each boot that ended
    error: str = ""
    stopped: threading.Event = dataclasses.field(default_factory=threading.Event)
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = dataclasses.field(default_factory=list)  # every QEMU process started, one per boot
    _stopping: bool = False
    _started: float = 0.0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def serial_log(self, port: int) -> Path:
        return self.directory / f"serial-port-{port}.log"

    @property
    def port3(self) -> Path:
        return self.serial_log(3)

    @property
    def console(self) -> Path:
        return self.serial_log(1)

    @property
    def console_socket(self) -> Path:
        return self.directory / "console.sock"

    def console_tail(self, lines: int = 5) -> str:
        """The console's (serial port 1's) last non-empty lines, for the error of a guest that stopped early:
        the instance's directory, the log with it, is removed when the workflow ends."""
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])

    def signs_of_life(self) -> tuple[int, ...]:
        """What changes while the guest makes progress: its boots, its disks' I/O operations (QMP
        `query-blockstats`; -1 while no QEMU answers) and the sizes of its serial port files."""
        operations = -1
        qmp = self.instance.qmp
        if qmp is not None and self.instance.running():
            with self.instance.lock, contextlib.suppress(QmpError, OSError, ValueError, TypeError, KeyError):
                stats = qmp.execute("query-blockstats")
                operations = sum(int(d["stats"]["rd_operations"]) + int(d["stats"]["wr_operations"]) for d in stats)
        sizes = []
        for port in range(1, qemu_boot.SERIAL_PORTS + 1):
            try:
                sizes.append(self.serial_log(port).stat().st_size)
            except OSError:
                sizes.append(-1)
        return (self.boots, operations, *sizes)

    def hang_report(self) -> str:
        """Where a hung guest is, for whoever looks for the cause: each vCPU's instruction pointer and halt
        state (QMP `info registers -a`), and each QEMU thread's state on this machine (R: running)."""
        cpus: list[str] = []
        qmp = self.instance.qmp
        if qmp is not None and self.instance.running():
            with self.instance.lock, contextlib.suppress(QmpError, OSError, ValueError):
                text = str(qmp.execute("human-monitor-command", **{"command-line": "info registers -a"}))
                for number, registers in re.findall(r"CPU#(\d+)\s*\n(.*?)(?=CPU#|\Z)", text, re.S):
                    rip, halted = re.search(r"(?:RIP|PC)=(\w+)", registers), re.search(r"HLT=(\d)", registers)
                    cpus.append(
                        f"{number} at {rip[1] if rip else '?'}{' halted' if halted and halted[1] == '1' else ''}"
                    )
        threads: list[str] = []
        proc = self.proc
        if proc is not None:
            for task in sorted(Path(f"/proc/{proc.pid}/task").glob("*")):
                with contextlib.suppress(OSError, IndexError):
                    stat = (task / "stat").read_text()
                    threads.append(f"{stat[stat.index('(') + 1 : stat.rindex(')')]} {stat[stat.rindex(')') + 2]}")
        return f"vCPUs: {', '.join(cpus) or '?'}; QEMU's threads: {', '.join(threads) or '?'}"

    def _argv(self, choice: BootChoice, kernel: Path, initrd: Path | None) -> list[str]:
        arch = qemu_boot.kernel_arch(kernel)
        spec = InstanceSpec(
            disks=self.disks,
            serial_port3=self.port3,
            console=self.console,
            qmp_socket=self.directory / "qmp.sock",
            metadata_socket=self.instance.metadata.socket,
            kernel=kernel,
            initrd=initrd,
            append=f"{choice.append} {self.extra_append}".rstrip(),
            memory_mb=self.memory_mb,
            cpus=self.cpus,
            accel=self.accel,
            serial_append=True,  # the serial files accumulate across boots
            events_socket=self.directory / "events.sock",
            forwards=self.forwards,
            serial_ports=tuple((port, self.serial_log(port)) for port in self.serial_ports if port not in (1, 3)),
            console_socket=self.console_socket if self.interactive else None,
            qemu=qemu_boot.QEMU if arch is Arch.AMD64 else qemu_boot.require_machine(arch),
            arch=arch,
        )
        return qemu_boot.qemu_argv(spec)

    def start(self) -> None:
        """Start the instance: its first boot, in the thread that supervises every boot of it.

        QEMU is forked by that long-lived thread because `die_with_us` (PR_SET_PDEATHSIG) kills a child
        when the *thread* that forked it ends, not only the process.
        """
        first: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._life, args=(first,), daemon=True,
                                        name=f"qemu-{self.instance.name}")  # fmt: skip
        self._thread.start()
        error = first.get()
        if error is not None:
            raise error

    def _life(self, first: queue.Queue[BaseException | None]) -> None:
        try:
            booted = self._boot()
        except BaseException as err:  # noqa: BLE001 - raised by start() in the step's thread
            self.stopped.set()
            first.put(err)
            return
        first.put(None)
        while booted is not None:
            proc, events = booted
            reason = self._watch(proc, events)
            with self._lock:
                stopping = self._stopping
            booted = None
            if stopping:
                break
            if reason == RESET:
                try:
                    booted = self._boot()
                except Exception as err:  # noqa: BLE001 - recorded for the wait that follows
                    self.error = f"instance {self.instance.name}: cannot boot again after the guest rebooted: {err}"
            elif reason != POWEROFF:
                self.error = f"instance {self.instance.name}: QEMU ended without a guest power-off{self._qemu_log()}"
        self.stopped.set()

    def _boot(self) -> tuple[subprocess.Popen[bytes], Qmp] | None:
        """Plan and start one boot and connect its QMP monitors; None when the instance is being stopped."""
        choice, kernel, initrd = plan_boot(self.disks[0], self.directory)
        for sock in ("qmp.sock", "events.sock", self.console_socket.name):
            (self.directory / sock).unlink(missing_ok=True)
        with self._lock:
            if self._stopping:
                return None
            log = open(self.directory / "qemu.log", "ab")  # noqa: SIM115 - handed to the child
            try:
                proc = subprocess.Popen(self._argv(choice, kernel, initrd), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, preexec_fn=runner.die_with_us())  # fmt: skip
            finally:
                log.close()
            self.proc = proc
            self.pids.append(proc.pid)
            self.boots += 1
            self._started = time.monotonic()
        with contextlib.suppress(Exception):  # a progress report never stops a boot
            self.on_boot(self, choice)

        def alive() -> bool:
            return proc.poll() is None

        try:
            events = Qmp.connect(self.directory / "events.sock", alive=alive)
            qmp = Qmp.connect(self.directory / "qmp.sock", alive=alive)
        except QmpError as err:
            self._kill(proc)
            raise InstanceError(f"instance {self.instance.name}: QEMU did not start: {err}{self._qemu_log()}") from None
        old = self.instance.qmp
        with self.instance.lock:
            self.instance.qmp, self.instance.running = qmp, alive
        if old is not None:
            old.close()
        return proc, events

    def _qemu_log(self) -> str:
        try:
            lines = (self.directory / "qemu.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f" ({lines[-1]})" if lines else ""

    def _watch(self, proc: subprocess.Popen[bytes], events: Qmp) -> str:
        """Wait for this boot's QEMU to end; the reason of its SHUTDOWN event (recorded in `reasons`)."""
        reason = ""
        try:
            while (event := events.next_event()) is not None:
                if event.get("event") == "SHUTDOWN":
                    reason = str(event.get("data", {}).get("reason", ""))
            proc.wait()
        finally:
            events.close()
        self.guest_seconds += time.monotonic() - self._started
        self.reasons.append(reason or f"exit status {proc.returncode}")
        return reason

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def stop(self) -> None:
        """Quit QEMU (kill it if it does not leave) and stop re-booting it."""
        with self._lock:
            self._stopping = True
            proc = self.proc
        if proc is not None and proc.poll() is None:
            qmp = self.instance.qmp
            if qmp is not None:
                with self.instance.lock, contextlib.suppress(QmpError, OSError):
                    qmp.execute("quit")
            try:
                proc.wait(QUIT_GRACE)
            except subprocess.TimeoutExpired:
                self._kill(proc)
        if self._thread is not None:
            self._thread.join(QUIT_GRACE)
        self.stopped.set()


class Stall:
    """Notices a guest that shows no sign of life (`Machine.signs_of_life`) for `machine.hang_after` seconds:
    no serial output on any port and no disk I/O. A wait calls `check` as often as it likes."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.last: tuple[int, ...] = ()
        self.since = self.next_look = time.monotonic()

    def check(self) -> None:
        hang_after = self.machine.hang_after
        now = time.monotonic()
        if hang_after <= 0 or now < self.next_look or self.machine.stopped.is_set():
            return
        self.next_look = now + LOOK
        sign = self.machine.signs_of_life()
        if sign != self.last:
            self.last, self.since = sign, now
        elif now - self.since >= hang_after:
            quiet = format_duration(round(now - self.since) * 10**9)
            tail = self.machine.console_tail()
            detail = f"; the console's last lines: {tail}" if tail else ""
            name = self.machine.instance.name
            log.warning("instance %s hangs: %s", name, self.machine.hang_report())
            raise InstanceError(f"instance {name}: {HUNG} {quiet} (no serial output, no disk I/O): it hangs{detail}")


class QemuInstances:
    """CreateInstances and WaitForInstancesSignal on QEMU, with the disks and metadata servers of `resources`."""

    def __init__(
        self,
        resources: Resources,
        *,
        accel: str | None = None,
        memory_mb: int = 2048,
        cpus: int = 2,
        rundir: Path | None = None,
        extra_append: str = "",
        forwards: tuple[tuple[str, int, Path], ...] = (),
        on_boot: Callable[[Machine, BootChoice], None] | None = None,
        serial_ports: tuple[int, ...] = (),
        hang_after: float = 0.0,
        interactive: bool = False,
    ) -> None:
        self.resources = resources
        self.hang_after = hang_after  # `Machine.hang_after` of every instance
        self.interactive = interactive  # `Machine.interactive` of every instance
        self.serial_ports = serial_ports  # recorded besides ports 1 and 3 (`Machine.serial_ports`)
        self.extra_append, self.forwards = extra_append, forwards
        self.on_boot = on_boot
        self.accel = accel or ""  # empty: decided at the first boot, with its kernel (`qemu_boot.kvm_runs`)
        self.memory_mb, self.cpus = memory_mb, cpus
        self.rundir = rundir  # parent of each instance's directory (short: it holds unix sockets)
        self.machines: dict[str, Machine] = {}
        self._lock = threading.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {"CreateInstances": self.create_instances, "WaitForInstancesSignal": self.wait_for_instances_signal}

    def create_instances(self, step: str, body: Any, context: StepContext) -> None:
        runner.require_tool(qemu_boot.QEMU, "qemu-system-x86")
        runner.require_tool("socat", "socat")
        for spec in _entries(body, step):
            if context.cancel.is_set():
                return
            name = str(_field(spec, "Name") or "")
            disks = tuple(str(_field(disk, "Source") or "") for disk in _field(spec, "Disks") or [])
            if not disks:
                raise InstanceError(f"{step}: instance {name!r} has no disks")
            metadata = _field(spec, "Metadata") or {}
            if not isinstance(metadata, dict):
                raise InstanceError(f"{step}: instance {name!r}: Metadata must be an object")
            instance = self.resources.add_instance(name, disks, {str(k): str(v) for k, v in metadata.items()}, context)
            directory = Path(tempfile.mkdtemp(prefix="cos-vm.", dir=self.rundir))
            machine = Machine(instance, tuple(self.resources.disks[d] for d in disks), directory, self.accel,
                              self.memory_mb, self.cpus, self.extra_append, self.forwards)  # fmt: skip
            machine.serial_ports, machine.hang_after = self.serial_ports, self.hang_after
            machine.interactive = self.interactive
            if self.on_boot is not None:
                machine.on_boot = self.on_boot
            with self._lock:
                self.machines[name] = machine

            def delete(machine: Machine = machine) -> None:
                try:
                    machine.stop()
                finally:
                    shutil.rmtree(machine.directory, ignore_errors=True)

            context.add_cleanup(f"stop instance {name}", delete)
            if not self.accel:
                _, kernel, _ = plan_boot(machine.disks[0], directory)
                native = qemu_boot.kernel_arch(kernel) is Arch.host()  # KVM runs this machine's kernels only
                self.accel = "kvm" if native and qemu_boot.kvm_runs(kernel, directory) else "tcg"
            machine.accel = self.accel
            machine.start()

    def _machine(self, name: str, step: str) -> Machine:
        with self._lock:
            found = self.machines.get(name)
        if found is None:
            raise InstanceError(f"{step}: instance {name!r} does not exist")
        return found

    def wait_for_instances_signal(self, step: str, body: Any, context: StepContext) -> None:
        entries = _entries(body, step)
        errors: list[str] = []
        threads = []
        for spec in entries:
            machine = self._machine(str(_field(spec, "Name") or ""), step)
            serial = _field(spec, "SerialOutput")
            if serial:
                port = int(str(_field(serial, "Port") or 1))
                if port not in (1, 3, *machine.serial_ports):
                    raise InstanceError(f"{step}: serial port {port}: the qemu executor records ports 1 and 3")
                target = self._wait_serial
            elif _field(spec, "Stopped"):
                port, target = 0, self._wait_stopped
            else:
                raise InstanceError(f"{step}: instance {machine.instance.name}: give SerialOutput or Stopped")

            def wait(target: Any = target, machine: Machine = machine, serial: Any = serial, port: int = port) -> None:
                try:
                    target(machine, serial, port, context)
                except InstanceError as err:
                    errors.append(str(err))

            threads.append(threading.Thread(target=wait, daemon=True))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise InstanceError(errors[0])

    @staticmethod
    def _wait_stopped(machine: Machine, serial: Any, port: int, context: StepContext) -> None:
        stall = Stall(machine)
        while not machine.stopped.is_set():
            if context.cancel.is_set() or context.remaining() <= 0:
                return
            stall.check()
            machine.stopped.wait(min(POLL * 5, context.remaining()))
        if machine.error:
            raise InstanceError(machine.error)

    @staticmethod
    def _wait_serial(machine: Machine, serial: Mapping[str, Any], port: int, context: StepContext) -> None:
        watcher = daisy_local.SerialWatcher(serial)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        path = machine.serial_log(port)
        position = 0
        name = machine.instance.name
        stall = Stall(machine)
        while True:
            stopped = machine.stopped.is_set()  # looked at before the last read, so no output is missed
            try:
                with open(path, "rb") as file:
                    file.seek(position)
                    chunk = file.read(SERIAL_READ)
            except FileNotFoundError:
                chunk = b""
            position += len(chunk)
            for kind, text in watcher.feed(decoder.decode(chunk)):
                if kind == "status":
                    context.status(text)
                elif kind == "failure":
                    raise InstanceError(f"instance {name}: FailureMatch found: {text}")
                elif kind == "success":
                    context.status(text)  # the line the wait ends on is part of the guest's story too
                    return
            full = len(chunk) == SERIAL_READ  # more is written already: read on before deciding anything
            if stopped and not full:
                detail = machine.error or f"the guest powered off after {machine.boots} boot(s)"
                tail = machine.console_tail()
                detail += f"; the console's last lines: {tail}" if tail else ""
                raise InstanceError(f"instance {name} stopped before its serial port {port} matched: {detail}")
            if not full:
                stall.check()
            if context.sleep(0 if full else POLL):
                return
