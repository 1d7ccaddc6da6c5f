"""What every command is made of: flags, a handler, and the shared context."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cos_customizer.cli.flags import Flag, Parsed
from cos_customizer.workspace import Workspace


@dataclass(frozen=True)
class Context:
    workspace_root: Path
    environ: Mapping[str, str]
    compute_endpoint: str = ""

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.workspace_root)


@dataclass(frozen=True)
class Command:
    name: str
    synopsis: str
    flags: tuple[Flag, ...]
    handler: Callable[[Context, Parsed], int]
    description: str = ""
    positional: tuple[str, ...] = ()

    @property
    def usage(self) -> str:
        names = " ".join(self.positional)
        return f"{self.name} {names + ' ' if names else ''}[flags]"
