"""The `boot` command: boot an image file as a GCE VM would and check it from inside through a serial port."""

from __future__ import annotations

import logging
from pathlib import Path

from cos_customizer.cli.command import Command, Context
from cos_customizer.cli.flags import Flag, Kind, Parsed
from cos_customizer.errors import UsageError, quoted, shown
from cos_customizer.executors.qemu import console, vm
from cos_customizer.executors.qemu.rehearsal import INSTANCE_CPUS, INSTANCE_MEMORY_MB
from cos_customizer.units import MiB, parse_duration, parse_size

log = logging.getLogger("cos_customizer")

DEFAULT_HANG_TIMEOUT = parse_duration("5m")
CONSOLE_TIMEOUT = parse_duration("24h")  # the console's, unless -timeout is given
DEFAULT_TIMEOUT = parse_duration("10m")
MEMORY_MIN_MB = 256  # less does not boot the sample's kernel and systemd
MEMORY_MAX_MB = 64 * 1024
CPUS_MAX = 64
USER_DATA = "user-data"


def job_from(args: Parsed, image: Path | None = None) -> vm.BootJob:
    """The boot the flags ask for; every bad input is one `UsageError` line, found before anything runs.

    `image` (a build file's output, not built yet) stands for -image-file and is not checked here."""
    if image is None and not args["image-file"]:
        raise UsageError("-image-file=IMAGE must be set: the raw, .qcow2 or GCE .tar.gz image file to boot")
    port = args["serial-port"]
    if port not in vm.SERIAL_PORTS:
        raise UsageError(f"-serial-port={port}: GCE's serial ports are 1 to 4")
    interactive = not args["success-match"]
    if interactive:
        for name in ("failure-match", "status-match"):
            if args[name]:
                raise UsageError(f"-{name} needs -success-match: without it boot is an interactive console")
        if port != 1:
            raise UsageError(f"-serial-port={port} needs -success-match: the interactive console is serial port 1")
    if args["timeout"] <= 0:
        raise UsageError("-timeout must be a positive duration, such as 10m")
    timeout = args["timeout"] if not interactive or "timeout" in args.given else CONSOLE_TIMEOUT
    if args["hang-timeout"] < 0:
        raise UsageError("-hang-timeout must be a duration, such as 5m, or 0 to wait for -timeout regardless")
    if image is None:
        image = Path(args["image-file"]).absolute()
        vm.check_image(image)
    metadata: dict[str, str] = {}
    for key, value in args["metadata"].items():
        vm.check_metadata_key(key)
        vm.check_metadata_value(key, value)
        metadata[key] = value
    for key, name in args["metadata-from-file"].items():
        vm.check_metadata_key(key)
        if key in metadata:
            raise UsageError(f"metadata {quoted(key)} is given by both -metadata and -metadata-from-file")
        metadata[key] = vm.read_metadata_file(key, Path(name))
    if args["user-data"]:
        if USER_DATA in metadata:
            raise UsageError("metadata 'user-data' is given twice: by -user-data and by -metadata(-from-file)")
        metadata[USER_DATA] = vm.read_metadata_file(USER_DATA, Path(args["user-data"]))
    return vm.BootJob(
        image=image,
        metadata=tuple(metadata.items()),
        port=port,
        success=args["success-match"],
        failures=(args["failure-match"],) if args["failure-match"] else (),
        status=args["status-match"],
        timeout=timeout / 1e9,
        hang_timeout=args["hang-timeout"] / 1e9,
        memory_mb=_memory_mb(args["memory"]),
        cpus=_cpus(args["cpus"]),
    )


def _memory_mb(text: str) -> int:
    """-memory as MiB: a size with its unit (512M, 2G), at least MEMORY_MIN_MB and whole MiB."""
    try:
        size = parse_size(text) if text[-1:].isalpha() else -1
    except ValueError:
        size = -1
    if size < MEMORY_MIN_MB * MiB or size % MiB or size > MEMORY_MAX_MB * MiB:
        raise UsageError(
            f"-memory={shown(text)}: give the guest's memory with its unit, from {MEMORY_MIN_MB}M to "
            f"{MEMORY_MAX_MB // 1024}G in whole MiB (for example 2G)"
        )
    return size // MiB


def _cpus(count: int) -> int:
    if not 1 <= count <= CPUS_MAX:
        raise UsageError(f"-cpus={count}: give 1 to {CPUS_MAX} virtual CPUs")
    return count


def handle_boot(context: Context, args: Parsed) -> int:
    return boot(context, job_from(args))


def boot(context: Context, job: vm.BootJob) -> int:
    """Boot `job`; 0 on its success match (or, as a console, once the guest is off), else `vm.GuestFailed` (exit 1)."""
    result = vm.run(job, context.environ, log.info)
    if job.console:
        how = "stopped by " + console.ESCAPE_NAME if result.escaped else "the guest powered off"
        log.info("The VM is off (%s; %d boot(s) under %s, %.1f s)", how, result.boots, result.accel.upper(),
                 result.seconds)  # fmt: skip
        return 0
    log.info(
        "Serial port %d said %s: the guest passed (%d boot(s) under %s, %.1f s)",
        job.port,
        quoted(result.line),
        result.boots,
        result.accel.upper(),
        result.seconds,
    )
    return 0


COMMAND = Command(
    name="boot",
    synopsis="Boot an image file as a GCE VM would and wait for a line on a serial port.",
    description=(
        "Boot a raw, .qcow2 or GCE .tar.gz image file under QEMU as a GCE VM boots it (the kernel COS's GRUB "
        "would choose, the boot disk as /dev/sda, a GCE metadata server serving -user-data and -metadata, "
        "serial ports 1 to 4), and wait on one serial port for -success-match or -failure-match, as Daisy's "
        "WaitForInstancesSignal waits. The image file is never written: the guest writes to a working copy "
        "that is removed afterwards. Exit 0 on the success match; 1 on the failure match, on -timeout, or "
        "when the guest stops before a match. Without -success-match it is an interactive console: serial "
        f"port 1 on this terminal (the bootable sample logs root in), until the guest powers off or "
        f"{console.ESCAPE_NAME} stops the VM. KVM is used where a kernel runs under it, else TCG "
        "($COS_CUSTOMIZER_QEMU_ACCEL=kvm|tcg forces one). An arm64 image (its kernel says so) boots under "
        "qemu-system-aarch64's virt machine with EDK2 firmware, its serial ports 2 to 4 PCI UARTs."
    ),
    flags=(
        Flag("image-file", Kind.STRING, "The image file to boot: raw, .qcow2 or GCE .tar.gz (required).", ours=True),
        Flag(
            "user-data",
            Kind.STRING,
            "A file served as the instance's user-data metadata attribute (a cloud-config, for cloud-init).",
            ours=True,
        ),
        Flag("metadata", Kind.MAP, "Instance metadata attributes: KEY=VALUE,...", ours=True),
        Flag(
            "metadata-from-file",
            Kind.MAP,
            "Instance metadata attributes read from files: KEY=FILE,...",
            ours=True,
        ),
        Flag("serial-port", Kind.INT, "The serial port (1 to 4) the matches are looked for on.", default=1, ours=True),
        Flag(
            "success-match",
            Kind.STRING,
            "The text (anywhere in a line of the serial port) that means the guest passed; exit 0. Without it, "
            f"boot is an interactive console: serial port 1 on this terminal until the guest powers off or "
            f"{console.ESCAPE_NAME} stops the VM (then -timeout is 24h unless given).",
            ours=True,
        ),
        Flag("failure-match", Kind.STRING, "The text that means the guest failed; exit 1 naming the line.", ours=True),
        Flag("status-match", Kind.STRING, "The text of progress lines, printed as they come.", ours=True),
        Flag(
            "memory",
            Kind.STRING,
            "The guest's memory, with its unit (512M, 2G; the rehearsal's 2G by default).",
            default=f"{INSTANCE_MEMORY_MB // 1024}G",
            ours=True,
        ),
        Flag(
            "cpus",
            Kind.INT,
            "The guest's virtual CPUs (the rehearsal's 2 by default).",
            default=INSTANCE_CPUS,
            ours=True,
        ),
        Flag(
            "timeout",
            Kind.DURATION,
            "How long to wait for a match (a duration such as 10m); then exit 1 with the console's last lines.",
            default=DEFAULT_TIMEOUT,
            ours=True,
        ),
        Flag(
            "hang-timeout",
            Kind.DURATION,
            "How long the guest may show no sign of life (no output on any serial port, no disk I/O) before it "
            "is called hung: exit 1 with the console's last lines. 0 waits for -timeout regardless.",
            default=DEFAULT_HANG_TIMEOUT,
            ours=True,
        ),
    ),
    handler=handle_boot,
)
