"""The provisioner config: boot-disk settings and the ordered list of steps.

This document travels to the preload VM (`config.json` on the CIDATA disk),
so it is modelled with the standard library only: frozen dataclasses, a
`StepType` enum, and a registry mapping each step type to its typed
arguments. JSON keys follow the Go original (`BuildContexts`, `BootDisk`,
`Steps`, `Type`, `Args`, ...) so the files stay recognisable.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from cos_customizer.errors import ConfigError


class StepType(enum.StrEnum):
    RUN_SCRIPT = "RunScript"
    INSTALL_GPU = "InstallGPU"
    DISABLE_AUTO_UPDATE = "DisableAutoUpdate"
    SEAL_OEM = "SealOEM"
    INSTALL_PACKAGES = "InstallPackages"


def _key(name: str, *, required: bool = False) -> Any:
    """A dataclass field stored under the JSON key `name`."""
    return {"json": name, "required": required}


def _field(name: str, default: Any = "", *, required: bool = False) -> Any:
    if isinstance(default, (tuple, str, int, bool)):
        return dataclasses.field(default=default, metadata=_key(name, required=required))
    raise TypeError(f"unsupported default for {name}")


class StepArgs:
    """Base of the typed arguments of one step type."""

    TYPE: ClassVar[StepType]

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


StepArgsT = TypeVar("StepArgsT", bound=type[StepArgs])

STEP_ARGS: dict[StepType, type[StepArgs]] = {}


def register(step_type: StepType) -> Callable[[StepArgsT], StepArgsT]:
    def decorate(cls: StepArgsT) -> StepArgsT:
        cls.TYPE = step_type
        STEP_ARGS[step_type] = cls
        return cls

    return decorate


@register(StepType.RUN_SCRIPT)
@dataclasses.dataclass(frozen=True)
class RunScriptArgs(StepArgs):
    build_context: str = _field("BuildContext", required=True)
    path: str = _field("Path", required=True)
    env: tuple[str, ...] = _field("Env", ())

    def to_json(self) -> dict[str, Any]:
        out = _to_json(self)
        # The original's provisioner reads Env as one "A=B,C=D" string (and fails on a list): write that
        # whenever it says the same thing; only a value holding a comma, which the string cannot carry,
        # needs the list, which only this provisioner reads.
        if not any("," in item for item in self.env):
            out["Env"] = ",".join(self.env)
        return out


@register(StepType.INSTALL_GPU)
@dataclasses.dataclass(frozen=True)
class InstallGPUArgs(StepArgs):
    nvidia_driver_version: str = _field("NvidiaDriverVersion", required=True)
    nvidia_driver_md5sum: str = _field("NvidiaDriverMD5Sum")
    nvidia_install_dir_host: str = _field("NvidiaInstallDirHost", "/var/lib/nvidia")
    nvidia_installer_container: str = _field("NvidiaInstallerContainer")
    gcs_deps_prefix: str = _field("GCSDepsPrefix")


@register(StepType.DISABLE_AUTO_UPDATE)
@dataclasses.dataclass(frozen=True)
class DisableAutoUpdateArgs(StepArgs):
    pass


@register(StepType.SEAL_OEM)
@dataclasses.dataclass(frozen=True)
class SealOEMArgs(StepArgs):
    pass


@register(StepType.INSTALL_PACKAGES)
@dataclasses.dataclass(frozen=True)
class InstallPackagesArgs(StepArgs):
    build_context: str = _field("BuildContext", required=True)
    pkg_spec_url: str = _field("PkgSpecURL", required=True)
    top_work_dir: str = _field("TopWorkDir")
    anthos_installer_dir: str = _field("AnthosInstallerDir")
    anthos_installer_version: str = _field("AnthosInstallerVersion")
    anthos_installer_release_bucket: str = _field("AnthosInstallerReleaseBucket")


@dataclasses.dataclass(frozen=True)
class Step:
    args: StepArgs

    @property
    def type(self) -> StepType:
        return self.args.TYPE

    def to_json(self) -> dict[str, Any]:
        return {"Type": self.type.value, "Args": self.args.to_json()}


@dataclasses.dataclass(frozen=True)
class BootDisk:
    oem_size: str = _field("OEMSize")
    oem_fs_size_4k: int = _field("OEMFSSize4K", 0)
    reclaim_sda3: bool = _field("ReclaimSDA3", False)
    wait_for_disk_resize: bool = _field("WaitForDiskResize", False)
    # Private (benchmarks): the shutdown relocation copies whole partitions, as before it read ext bitmaps.
    # Its key starts with "_" and is written only when set.
    full_copy_relocation: bool = _field("_FullCopyRelocation", False)

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)


@dataclasses.dataclass(frozen=True)
class ProvisionerConfig:
    build_contexts: tuple[tuple[str, str], ...] = ()
    boot_disk: BootDisk = BootDisk()
    steps: tuple[Step, ...] = ()

    def with_step(self, args: StepArgs) -> ProvisionerConfig:
        return dataclasses.replace(self, steps=(*self.steps, Step(args)))

    def with_boot_disk(self, **changes: Any) -> ProvisionerConfig:
        return dataclasses.replace(self, boot_disk=dataclasses.replace(self.boot_disk, **changes))

    def has_step(self, step_type: StepType) -> bool:
        return any(step.type is step_type for step in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "BuildContexts": dict(self.build_contexts),
            "BootDisk": self.boot_disk.to_json(),
            "Steps": [step.to_json() for step in self.steps],
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "provisioner config") -> ProvisionerConfig:
        obj = _expect_object(data, where)
        _reject_unknown(obj, {"BuildContexts", "BootDisk", "Steps"}, where)
        contexts = _expect_object(_or(obj.get("BuildContexts"), {}), f"{where}: BuildContexts")
        for name, url in contexts.items():
            if not isinstance(url, str):
                raise ConfigError(f"{where}: BuildContexts.{name} must be a string")
        boot_disk = _from_json(BootDisk, _or(obj.get("BootDisk"), {}), f"{where}: BootDisk")
        raw_steps = _or(obj.get("Steps"), [])
        if not isinstance(raw_steps, list):
            raise ConfigError(f"{where}: Steps must be a list")
        steps = tuple(_step_from_json(raw, f"{where}: Steps[{index}]") for index, raw in enumerate(raw_steps))
        return cls(tuple(sorted(contexts.items())), boot_disk, steps)


def _step_from_json(data: Any, where: str) -> Step:
    obj = _expect_object(data, where)
    _reject_unknown(obj, {"Type", "Args"}, where)
    raw_type = obj.get("Type")
    if not isinstance(raw_type, str) or not raw_type:
        raise ConfigError(f'{where}: missing required field "Type"')
    try:
        step_type = StepType(raw_type)
    except ValueError:
        known = ", ".join(t.value for t in StepType)
        raise ConfigError(f'{where}: unknown step type "{raw_type}"; known types: {known}') from None
    args = _or(obj.get("Args"), {})
    return Step(_from_json(STEP_ARGS[step_type], args, f"{where} ({step_type.value})"))


T = TypeVar("T")


def _to_json(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if field.metadata["json"].startswith("_") and item == field.default:
            continue  # a private field at its default: not in the document
        out[field.metadata["json"]] = list(item) if isinstance(item, tuple) else item
    return out


def _from_json(cls: type[T], data: Any, where: str) -> T:
    obj = _expect_object(data, where)
    fields = {field.metadata["json"]: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    _reject_unknown(obj, set(fields), where)
    values: dict[str, Any] = {}
    for key, field in fields.items():
        if key not in obj or obj[key] in (None, ""):
            if field.metadata["required"]:
                raise ConfigError(f'{where}: missing required field "{key}"')
            continue
        values[field.name] = _convert(obj[key], field.default, key, where)
    return cls(**values)


def _convert(value: Any, default: Any, key: str, where: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, not {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ConfigError(f"{where}: {key} must be a whole number >= 0, not {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {key} must be a string, not {value!r}")
    # Lists of strings. The Go original stores Env as one "A=B,C=D" string.
    if isinstance(value, str):
        return tuple(item for item in value.split(",") if item)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ConfigError(f"{where}: {key} must be a list of strings, not {value!r}")


def _or(value: Any, default: Any) -> Any:
    """JSON null (Go's nil map, slice or RawMessage) means the default."""
    return default if value is None else value


def _expect_object(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, not {type(data).__name__}")
    return data


def _reject_unknown(obj: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ConfigError(f'{where}: unknown field "{unknown[0]}"; known fields: {", ".join(sorted(known))}')
