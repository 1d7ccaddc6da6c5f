"""The end-of-build summary: steps, times, partition tables, verity root hash, output.

The executor fills a `Summary` as it builds and hands it here with the
build it describes; this module knows no executor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table as RichTable

from cos_customizer.disk.gpt import CHROMEOS_KERNEL
from cos_customizer.disk.planner import DiskPlan
from cos_customizer.disk.verity import VerityParams
from cos_customizer.images import ImageFormat
from cos_customizer.units import human_size


@dataclasses.dataclass
class Summary:
    """What a build did: its phases and steps with their seconds, the cleanup, the OEM's verity."""

    phases: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    steps: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    cleanup: list[str] = dataclasses.field(default_factory=list)
    oem_verity: VerityParams | None = None
    notes: list[str] = dataclasses.field(default_factory=list)  # executor-specific lines, printed last


class Built(Protocol):
    """The build a summary describes (the local executor's `LocalBuild`)."""

    @property
    def output(self) -> Path: ...

    @property
    def format(self) -> ImageFormat: ...

    @property
    def plan(self) -> DiskPlan: ...


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr while the block runs (when stderr is a terminal); yields `update(done, total)`."""
    if not sys.stderr.isatty():
        yield lambda _done, _total: None
        return
    columns = (TextColumn("    {task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def summary(build: Built, result: Summary) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=110, no_color=True, highlight=False)
    console.print(f"Build succeeded: {build.output}")
    steps = RichTable("step", "seconds", title="Steps", title_justify="left")
    for name, seconds in result.steps:
        steps.add_row(name, f"{seconds:.2f}")
    if not result.steps:
        steps.add_row("(none)", "")
    console.print(steps)
    phases = RichTable("phase", "seconds", title="Phases", title_justify="left")
    for name, seconds in result.phases:
        phases.add_row(name, f"{seconds:.2f}")
    console.print(phases)
    parts = RichTable(
        "#",
        "name",
        "before start",
        "before size",
        "after start",
        "after size",
        "kernel priority",
        title="Partitions (sectors)",
        title_justify="left",
    )
    before = {p.number: p for p in build.plan.before.partitions}
    for part in build.plan.after.partitions:
        old = before[part.number]
        same = (old.first, old.size) == (part.first, part.size)
        parts.add_row(
            str(part.number),
            part.name,
            str(old.first),
            str(old.size),
            "" if same else str(part.first),
            "" if same else str(part.size),
            f"{old.priority} -> {part.priority}" if part.type_guid == CHROMEOS_KERNEL else "",
        )
    console.print(parts)
    if result.oem_verity is not None:
        console.print(f"OEM verity root hash: {result.oem_verity.root_hexdigest}")
        console.print(f"OEM verity salt:      {result.oem_verity.salt_hex}")
    stat = build.output.stat()
    size, allocated = human_size(stat.st_size), human_size(stat.st_blocks * 512)
    console.print(f"Output: {build.output} ({build.format.value}), size {size}, allocated {allocated}")
    if result.cleanup:
        console.print("Cleanup: " + "; ".join(result.cleanup))
    for note in result.notes:
        console.print(note)
    return buffer.getvalue()
