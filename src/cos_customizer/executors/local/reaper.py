"""What a local build leaves outside its own processes, removed as soon as the tool ends, however it ends.

The build's cgroups cannot be made unnamed, and a file system without
O_TMPFILE needs a named work directory: neither goes away with the process
that made them. So the local executor starts this helper first, in a session
of its own, reading a pipe whose only writer is the tool: end of file means
the tool has ended (a SIGKILL too). Then the helper kills whatever still
runs in the build's cgroup (the stage and everything it started live
there) and removes it, removes the work directory if the build had one, and
exits. After a normal end the tool has done all of it already, and the
helper finds nothing to do. Standard library only.

Usage: python -m cos_customizer.executors.local.reaper CGROUP [WORKDIR]
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

from cos_customizer.executors.local import cgroups


def wait_for_the_tool() -> None:
    """Block until the tool's end of the pipe on stdin is closed (what it writes is ignored)."""
    while os.read(0, 4096):
        pass


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):  # the tool's terminal going away: keep on
        signal.signal(sig, signal.SIG_IGN)
    name, *work = argv
    if not cgroups.NAME.fullmatch(name):
        print(f"cos-customizer reaper: not a build cgroup name: {name!r}", file=sys.stderr)
        return 2
    wait_for_the_tool()
    status = 0
    left = cgroups.remove(name)
    if left:
        print(f"cos-customizer: warning: the build's cgroup {left[0]} could not be removed", file=sys.stderr)
        status = 1
    for directory in map(Path, work):
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            print(f"cos-customizer: warning: {directory} could not be removed", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
