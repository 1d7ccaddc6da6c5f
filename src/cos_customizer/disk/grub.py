"""grub.cfg: pure edits of the kernel command lines, and reading/writing it on the FAT.

The edits are pure functions of the file's text (tested against expected
output); `read_grub_cfg`/`write_grub_cfg` reach into the EFI-SYSTEM FAT of
an image with mtools, at a byte offset, without mounting anything.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from cos_customizer.errors import CustomizerError
from cos_customizer.runner import memory_file, require_tool, run

GRUB_CFG = "::/efi/boot/grub.cfg"
ANCHOR = "cros_efi"
UPDATE_ENGINE = "update-engine.service"
OEM_MOUNT = "usr-share-oem.mount"
OEM_DEVICE = "oemroot"
# A verity argument of the kernel command line: the ChromeOS `dm="..."` or the upstream `dm-mod.create="..."`.
_VERITY_ARG = re.compile(r'(?<![^\s])(dm|dm-mod\.create)="([^"]*)"')


def mask_units(cfg: str, *units: str) -> str:
    """Insert `systemd.mask=UNIT` right after `cros_efi` on every line that has it, once per line.

    The units are masked one after another, each inserted right after `cros_efi` as the original
    masks one service at a time: `mask_units(cfg, A, B)` gives `cros_efi systemd.mask=B systemd.mask=A`.
    """
    lines = cfg.split("\n")
    for index, line in enumerate(lines):
        for unit in units:
            match = re.search(rf"(?<!\S){ANCHOR}(?!\S)", line)
            if match is None:
                break
            if f"systemd.mask={unit}" not in line.split():
                line = f"{line[: match.end()]} systemd.mask={unit}{line[match.end() :]}"
        lines[index] = line
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class DmTarget:
    """One table of a device-mapper argument, the same shape for both kernel command line forms.

    `dm="1 NAME none ro 1,START SECTORS verity k=v ..."` gives its `k=v` words as `params`. The
    upstream `dm-mod.create="NAME,UUID,MINOR,FLAGS,START SECTORS verity ARGS..."` gives its positional
    verity arguments under the same keys (`payload`, `hashtree`, `hashstart` in 512-byte sectors,
    `alg`, `root_hexdigest`, `salt`), plus `version`, `data_block_size`, `hash_block_size`,
    `data_blocks` and `hash_start_block` as written.
    """

    name: str
    start: int
    sectors: int
    target: str
    params: dict[str, str]
    form: str = "dm"  # "dm" or "dm-mod"


# The positional arguments of a verity table (the kernel's dm-verity documentation), under our keys.
_VERITY_ARGS = ("version", "payload", "hashtree", "data_block_size", "hash_block_size", "data_blocks",
                "hash_start_block", "alg", "root_hexdigest", "salt")  # fmt: skip


def read_dm(cfg: str) -> list[list[DmTarget]]:
    """The devices of every `dm="..."` or `dm-mod.create="..."` argument, in the order of the file."""
    found = []
    for match in _VERITY_ARG.finditer(cfg):
        form, value = match.group(1), match.group(2)
        found.append(parse_dm(value) if form == "dm" else parse_dm_mod(value))
    return found


def parse_dm(value: str) -> list[DmTarget]:
    pieces = [piece.strip() for piece in value.split(",")]
    head = pieces[0].split()
    if len(head) < 2 or not head[0].isdigit():
        raise CustomizerError(f'cannot parse dm="{value}": expected "<count> <name> none ro 1,<table>"')
    count = int(head[0])
    pieces[0] = " ".join(head[1:])
    if len(pieces) != 2 * count:
        raise CustomizerError(f'cannot parse dm="{value}": {count} devices announced, {len(pieces) // 2} found')
    targets = []
    for header, table in zip(pieces[0::2], pieces[1::2], strict=True):
        words = table.split()
        if len(words) < 3:
            raise CustomizerError(f'cannot parse dm="{value}": table "{table}" is too short')
        params = dict(word.split("=", 1) for word in words[3:] if "=" in word)
        targets.append(DmTarget(header.split()[0], int(words[0]), int(words[1]), words[2], params))
    return targets


def parse_dm_mod(value: str) -> list[DmTarget]:
    """The devices of `dm-mod.create="NAME,UUID,MINOR,FLAGS,TABLE[,TABLE...][;NAME,...]"`."""
    targets = []
    for device in value.split(";"):
        fields = device.split(",")
        if len(fields) < 5 or not fields[0].strip():
            raise CustomizerError(
                f'cannot parse dm-mod.create="{value}": expected "<name>,<uuid>,<minor>,<flags>,<table>"'
            )
        for table in fields[4:]:
            words = table.split()
            if len(words) < 3 or not words[0].isdigit() or not words[1].isdigit():
                raise CustomizerError(
                    f'cannot parse dm-mod.create="{value}": table "{table}" is not "<start> <sectors> <target> ..."'
                )
            params: dict[str, str] = {}
            if words[2] == "verity":
                args = words[3:]
                if len(args) < len(_VERITY_ARGS) or not all(args[i].isdigit() for i in (3, 4, 5, 6)):
                    raise CustomizerError(
                        f'cannot parse dm-mod.create="{value}": verity table "{table}" is not "<version> <dev> '
                        "<hash_dev> <data_block_size> <hash_block_size> <data_blocks> <hash_start_block> <alg> "
                        '<digest> <salt>"'
                    )
                params = dict(zip(_VERITY_ARGS, args, strict=False))
                params["hashstart"] = str(int(params["hash_start_block"]) * int(params["hash_block_size"]) // 512)
            targets.append(DmTarget(fields[0].strip(), int(words[0]), int(words[1]), words[2], params, "dm-mod"))
    return targets


def _has_oem(form: str, value: str) -> bool:
    if form == "dm":
        return f",{OEM_DEVICE} " in value
    return any(device.split(",", 1)[0].strip() == OEM_DEVICE for device in value.split(";"))


def check_oem_verity(cfg: str) -> None:
    """Refuse a grub.cfg that `add_oem_verity` could not add the OEM device to (read only, raises)."""
    found = list(_VERITY_ARG.finditer(cfg))
    if not found:
        raise CustomizerError(
            "grub.cfg has no dm= or dm-mod.create= verity line to add the OEM to: "
            "seal-oem needs the verified boot entries of a COS image's efi/boot/grub.cfg"
        )
    for match in found:
        form, value = match.group(1), match.group(2)
        if form == "dm" and not value.startswith("1 ") and not _has_oem(form, value):
            raise CustomizerError(
                f'grub.cfg has dm="{value.split(",", 1)[0]},...": seal-oem adds the OEM to a dm= line '
                "of one device (the root), not to this one"
            )


def add_oem_verity(cfg: str, *, partuuid: str, fs_size_4k: int, root_hexdigest: str, salt: str) -> str:
    """Add the `oemroot` verity device to every verity argument, in the form that argument has.

    `dm="1 vroot ..."` becomes `dm="2 vroot ...,oemroot none ro 1, 0 ..."`; `dm-mod.create="vroot,...`
    gets `;oemroot,,,ro,0 ...` before its closing quote. Arguments that already carry an `oemroot`
    device are left alone, so the edit is idempotent.
    """
    sectors = fs_size_4k * 8
    entry_dm = (
        f",{OEM_DEVICE} none ro 1, 0 {sectors} verity payload=PARTUUID={partuuid} hashtree=PARTUUID={partuuid} "
        f"hashstart={sectors} alg=sha256 root_hexdigest={root_hexdigest} salt={salt}"
    )
    entry_dm_mod = (
        f";{OEM_DEVICE},,,ro,0 {sectors} verity 0 PARTUUID={partuuid} PARTUUID={partuuid} "
        f"4096 4096 {fs_size_4k} {fs_size_4k} sha256 {root_hexdigest} {salt}"
    )

    def edit(match: re.Match[str]) -> str:
        form, value = match.group(1), match.group(2)
        if _has_oem(form, value):
            return match.group(0)
        if form == "dm":
            if not value.startswith("1 "):
                return match.group(0)
            return f'dm="2{value[1:]}{entry_dm}"'
        return f'dm-mod.create="{value}{entry_dm_mod}"'

    return _VERITY_ARG.sub(edit, cfg)


def _mtools_env() -> dict[str, str]:
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def read_grub_cfg(image: Path, offset: int) -> str:
    """grub.cfg from the FAT file system at byte `offset` of `image`."""
    tool = require_tool("mtype", "mtools")
    result = run([tool, "-i", f"{image}@@{offset}", GRUB_CFG], env=_mtools_env())
    return result.stdout.decode()


def write_grub_cfg(image: Path, offset: int, text: str, epoch: int | None = None) -> None:
    """Replace grub.cfg in the FAT file system at byte `offset` of `image`; dated `epoch` when set (mtools
    records SOURCE_DATE_EPOCH instead of the time)."""
    tool = require_tool("mcopy", "mtools")
    with memory_file("grub.cfg", text.encode()) as local:  # nothing to remove, even after a SIGKILL
        env = _mtools_env() if epoch is None else {**_mtools_env(), "SOURCE_DATE_EPOCH": str(epoch)}
        run([tool, "-o", "-i", f"{image}@@{offset}", str(local), GRUB_CFG], env=env)
