"""Commands of this tool that the Go original does not have."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cos_customizer import provisioner_build
from cos_customizer.arch import Arch
from cos_customizer.cli.command import Command, Context
from cos_customizer.cli.flags import Flag, Kind, Parsed
from cos_customizer.errors import ValidationError
from cos_customizer.sample import guest as sample_guest
from cos_customizer.sample import image as sample_image
from cos_customizer.units import human_size

log = logging.getLogger(__name__)


def _check_grub_format(value: str) -> None:
    if value not in sample_image.GRUB_FORMATS:
        raise ValueError(f"use one of {', '.join(sample_image.GRUB_FORMATS)}")


def handle_sample_image(_context: Context, args: Parsed) -> int:
    if args["size-gb"] < 10:
        raise ValidationError(f"-size-gb={args['size-gb']}: a sample COS image needs at least 10 GB")
    output = Path(args.positional[0]).absolute()
    if output.exists() or output.is_symlink():
        raise ValidationError(f"{output} already exists: remove it or choose another name")
    if not output.parent.is_dir():
        raise ValidationError(f"{output}: the directory {output.parent} does not exist")
    started = time.monotonic()
    if args["bootable"]:
        sample_guest.check_host()
    sample = sample_image.build(
        output,
        args["size-gb"],
        grub_format=args["grub-format"],
        bootable=args["bootable"],
        with_containers=args["with-containers"],
        arch=Arch.parse(args["arch"]),
    )
    allocated = output.stat().st_blocks * 512
    log.info(
        "Wrote %s: a %d GB COS-layout disk image (%s allocated) in %.1f s; ROOT-A verity root hash %s",
        output,
        args["size-gb"],
        human_size(allocated),
        time.monotonic() - started,
        sample.root_hexdigest,
    )
    return 0


SAMPLE_IMAGE = Command(
    name="sample-image",
    synopsis="Write a small sample COS disk image to try the tool with.",
    description=(
        "Write a sparse disk image with the real COS partition layout and a small runnable ROOT-A, so the "
        "tool can be tried with no COS image at hand. With -bootable, ROOT-A is a Debian systemd root laid "
        "out as COS and EFI-SYSTEM has a kernel and initramfs, so the image boots under QEMU (the qemu executor). "
        "With -with-containers, ROOT-A also has this machine's docker, containerd and runc."
    ),
    flags=(
        Flag("size-gb", Kind.INT, "Size of the disk image in GB.", default=10, ours=True),
        Flag(
            "arch",
            Kind.STRING,
            "The image's machine: amd64 (x86-64) or arm64. Another machine's commands (and with -bootable its "
            "Debian root and kernel) come from Debian's packages for it; needs root and debootstrap.",
            default=Arch.host().debian,
            check=Arch.parse,
            ours=True,
        ),
        Flag(
            "grub-format",
            Kind.STRING,
            'How grub.cfg declares the root\'s dm-verity device: "dm" (dm="1 vroot none ro 1,...", older COS) '
            'or "dm-mod" (dm-mod.create="vroot,,,ro,...", newer COS).',
            default="dm",
            check=_check_grub_format,
            ours=True,
        ),
        Flag(
            "bootable",
            Kind.BOOL,
            "Make an image that really boots (QEMU): a Debian systemd root with cloud-init, laid out as COS, "
            "and a Debian kernel and initramfs on EFI-SYSTEM. Needs root, debootstrap and busybox-static; "
            "the guest is built once (a few minutes) and cached in ~/.cache/cos-customizer/sample-guest.",
            default=False,
            ours=True,
        ),
        Flag(
            "with-containers",
            Kind.BOOL,
            "Also copy this machine's container runtime into ROOT-A at COS's paths (docker, dockerd, "
            "containerd, ctr, runc, legacy iptables and their libraries; Debian's docker.io, containerd, runc "
            "and iptables packages), with COS-shaped systemd units and a docker group, so run-script can use "
            "docker and ctr. With -bootable, the runtime starts at boot and finds what a build preloaded.",
            default=False,
            ours=True,
        ),
    ),
    handler=handle_sample_image,
    positional=("OUTPUT",),
)


def handle_build_provisioner(context: Context, args: Parsed) -> int:
    if not args["output"]:
        raise ValidationError("-output=PATH must be set: where to write the provisioner executable")
    output = Path(args["output"]).absolute()
    if not output.parent.is_dir():
        raise ValidationError(f"{output}: the directory {output.parent} does not exist")
    started = time.monotonic()
    path, origin = provisioner_build.provide(output, context.environ, arch=Arch.parse(args["arch"]))
    log.info(
        "Wrote %s (%s, %s) in %.1f s",
        path,
        human_size(path.stat().st_size),
        origin,
        time.monotonic() - started,
    )
    return 0


BUILD_PROVISIONER = Command(
    name="build-provisioner",
    synopsis="Build the standalone provisioner executable for COS VMs.",
    description="Build the provisioner as one static executable that runs on a COS VM with nothing installed.",
    flags=(
        Flag("output", Kind.STRING, "Where to write the executable.", ours=True),
        Flag(
            "arch",
            Kind.STRING,
            "The machine it runs on: amd64 (x86-64) or arm64 (aarch64). arm64 on an x86-64 machine is frozen in "
            "a Debian arm64 root under qemu-user-static (root, debootstrap; the root is built once and cached).",
            default="amd64",
            check=Arch.parse,
            ours=True,
        ),
    ),
    handler=handle_build_provisioner,
)
