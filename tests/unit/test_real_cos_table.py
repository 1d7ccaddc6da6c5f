"""The sample image's partition table against a real COS disk's.

The oracle is `sgdisk -p` of a real cos-81-12871-119 disk, as published in
the original's repository (dims/cos-tools,
src/cmd/cos_image_analyzer/internal/testdata/image1/partitions.txt); only its
partition rows are used. STATE's end differs (that disk's table was not at
the 10 GiB end); every other partition must match to the sector, with the
same name and sgdisk type code.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REAL_COS_81 = """\
   1         8704000        18874476   4.8 GiB     8300  STATE
   2           20480           53247   16.0 MiB    7F00  KERN-A
   3         4509696         8703999   2.0 GiB     7F01  ROOT-A
   4           53248           86015   16.0 MiB    7F00  KERN-B
   5          315392         4509695   2.0 GiB     7F01  ROOT-B
   6           16448           16448   512 bytes   7F00  KERN-C
   7           16449           16449   512 bytes   7F01  ROOT-C
   8           86016          118783   16.0 MiB    8300  OEM
   9           16450           16450   512 bytes   7F02  reserved
  10           16451           16451   512 bytes   7F02  reserved
  11              64           16447   8.0 MiB     EF02  RWFW
  12          249856          315391   32.0 MiB    EF00  EFI-SYSTEM
"""


def rows(listing: str) -> list[tuple[int, int, int, str, str]]:
    """(number, start, end, code, name) of each partition row of `sgdisk -p`."""
    found = []
    for line in listing.splitlines():
        words = line.split()
        if len(words) >= 6 and words[0].isdigit():
            found.append((int(words[0]), int(words[1]), int(words[2]), words[-2], words[-1]))
    return sorted(found)


def test_the_sample_image_has_a_real_cos_disks_partitions(sample_raw: Path) -> None:
    listing = subprocess.run(["sgdisk", "-p", str(sample_raw)], capture_output=True, text=True, check=True).stdout
    ours, real = rows(listing), rows(REAL_COS_81)
    assert len(ours) == len(real) == 12
    assert [row for row in ours if row[0] != 1] == [row for row in real if row[0] != 1]
    state, real_state = ours[0], real[0]
    assert (state[1], state[3], state[4]) == (real_state[1], real_state[3], real_state[4])
    assert state[2] == 10 * 2097152 - 34  # STATE ends at the last usable sector of the 10 GiB sample
