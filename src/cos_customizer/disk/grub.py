"""grub.cfg: pure edits of the kernel command lines, and reading/writing it on the FAT.

The edits are pure functions of the file's text (tested against expected
output); `read_grub_cfg`/`write_grub_cfg` reach into the EFI-SYSTEM FAT of
an image with mtools, at a byte offset, without mounting anything.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path

from cos_customizer.errors import CustomizerError
from cos_customizer.runner import require_tool, run

GRUB_CFG = "::/efi/boot/grub.cfg"
ANCHOR = "cros_efi"
UPDATE_ENGINE = "update-engine.service"
OEM_MOUNT = "usr-share-oem.mount"
_DM = re.compile(r'dm="([^"]*)"')


def mask_units(cfg: str, *units: str) -> str:
    """Insert `systemd.mask=UNIT` right after `cros_efi` on every line that has it, once per line."""
    lines = cfg.split("\n")
    for index, line in enumerate(lines):
        match = re.search(rf"(?<!\S){ANCHOR}(?!\S)", line)
        if match is None:
            continue
        missing = [f"systemd.mask={unit}" for unit in units if f"systemd.mask={unit}" not in line.split()]
        if missing:
            lines[index] = line[: match.end()] + "".join(f" {item}" for item in missing) + line[match.end() :]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class DmTarget:
    """One device of a `dm="..."` argument: `NAME none ro 1,START SECTORS verity k=v ...`."""

    name: str
    start: int
    sectors: int
    target: str
    params: dict[str, str]


def read_dm(cfg: str) -> list[list[DmTarget]]:
    """The devices of every `dm="..."` argument, line by line."""
    found = []
    for match in _DM.finditer(cfg):
        found.append(parse_dm(match.group(1)))
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


def add_oem_verity(cfg: str, *, partuuid: str, fs_size_4k: int, root_hexdigest: str, salt: str) -> str:
    """Add the `oemroot` verity device to every `dm="1 vroot` line (dm count 1 becomes 2).

    Lines that already carry an `oemroot` device are left alone, so the edit is idempotent.
    """
    sectors = fs_size_4k * 8
    entry = (
        f",oemroot none ro 1, 0 {sectors} verity payload=PARTUUID={partuuid} hashtree=PARTUUID={partuuid} "
        f"hashstart={sectors} alg=sha256 root_hexdigest={root_hexdigest} salt={salt}"
    )

    def edit(match: re.Match[str]) -> str:
        value = match.group(1)
        if not value.startswith("1 vroot") or ",oemroot " in value:
            return match.group(0)
        return f'dm="2{value[1:]}{entry}"'

    return _DM.sub(edit, cfg)


def _mtools_env() -> dict[str, str]:
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def read_grub_cfg(image: Path, offset: int) -> str:
    """grub.cfg from the FAT file system at byte `offset` of `image`."""
    tool = require_tool("mtype", "mtools")
    result = run([tool, "-i", f"{image}@@{offset}", GRUB_CFG], env=_mtools_env())
    return result.stdout.decode()


def write_grub_cfg(image: Path, offset: int, text: str) -> None:
    """Replace grub.cfg in the FAT file system at byte `offset` of `image`."""
    tool = require_tool("mcopy", "mtools")
    with tempfile.TemporaryDirectory(prefix="cos-customizer-grub.") as tmp:
        local = Path(tmp) / "grub.cfg"
        local.write_text(text)
        run([tool, "-o", "-i", f"{image}@@{offset}", str(local), GRUB_CFG], env=_mtools_env())
