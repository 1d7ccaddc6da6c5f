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
    # Whether -local-state-workdir was given (`build` makes a temporary workspace when it was not).
    workdir_given: bool = False

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
    # How many of `positional` must be given (None: all of them).
    required_positional: int | None = None

    @property
    def usage(self) -> str:
        names = " ".join(self.positional)
        return f"{self.name} {names + ' ' if names else ''}[flags]"
