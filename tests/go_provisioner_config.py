"""Read a provisioner config the way the Go original's provisioner does.

Written from the original's source (src/pkg/provisioner/config.go and the *_step.go files of
GoogleCloudPlatform/cos-customizer): `json.Unmarshal` into

    type Config struct { BuildContexts map[string]string; BootDisk BootDiskConfig; Steps []StepConfig }
    type BootDiskConfig struct { OEMSize string; OEMFSSize4K uint64; ReclaimSDA3 bool; WaitForDiskResize bool }
    type StepConfig struct { Type string; Args json.RawMessage }
    type RunScriptStep struct { BuildContext, Path, Env string }
    type InstallGPUStep struct { NvidiaDriverVersion, NvidiaDriverMD5Sum, NvidiaInstallDirHost,
                                 NvidiaInstallerContainer, GCSDepsPrefix string }
    type InstallPackagesStep struct { BuildContext, PkgSpecURL, AnthosInstallerDir, AnthosInstallerVersion,
                                      AnthosInstallerReleaseBucket string }

then `parseStep`, which unmarshals Args for RunScript, InstallGPU and InstallPackages, takes DisableAutoUpdate
and SealOEM without arguments and refuses any other type. encoding/json's rules kept here: a null is the
zero value, names match case-insensitively, unknown fields are ignored, and a JSON value of another kind
than the Go field's is the error `json: cannot unmarshal KIND into Go struct field S.F of type T`.
This is an independent reading: it shares no code with cos_customizer.
"""

from __future__ import annotations

import json
from typing import Any


class GoDecodeError(Exception):
    pass


_STRING, _UINT64, _BOOL, _MAP, _STEPS, _BOOTDISK, _RAW = "string", "uint64", "bool", "map", "steps", "boot", "raw"

_CONFIG = {"BuildContexts": _MAP, "BootDisk": _BOOTDISK, "Steps": _STEPS}
_BOOT_DISK = {"OEMSize": _STRING, "OEMFSSize4K": _UINT64, "ReclaimSDA3": _BOOL, "WaitForDiskResize": _BOOL}
_STEP_CONFIG = {"Type": _STRING, "Args": _RAW}
_STEP_TYPES: dict[str, tuple[str, dict[str, str]] | None] = {
    "RunScript": ("RunScriptStep", dict.fromkeys(("BuildContext", "Path", "Env"), _STRING)),
    "InstallGPU": (
        "InstallGPUStep",
        dict.fromkeys(
            (
                "NvidiaDriverVersion",
                "NvidiaDriverMD5Sum",
                "NvidiaInstallDirHost",
                "NvidiaInstallerContainer",
                "GCSDepsPrefix",
            ),
            _STRING,
        ),
    ),
    "InstallPackages": (
        "InstallPackagesStep",
        dict.fromkeys(
            (
                "BuildContext",
                "PkgSpecURL",
                "AnthosInstallerDir",
                "AnthosInstallerVersion",
                "AnthosInstallerReleaseBucket",
            ),
            _STRING,
        ),
    ),
    "DisableAutoUpdate": None,
    "SealOEM": None,
}
_GO_TYPES = {_STRING: "string", _UINT64: "uint64", _BOOL: "bool", _MAP: "map[string]string"}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _mismatch(value: Any, struct: str, field: str, go_type: str) -> GoDecodeError:
    return GoDecodeError(
        f"json: cannot unmarshal {_kind(value)} into Go struct field {struct}.{field} of type {go_type}"
    )


def _struct(obj: Any, struct: str, fields: dict[str, str]) -> dict[str, Any]:
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise GoDecodeError(f"json: cannot unmarshal {_kind(obj)} into Go value of type {struct}")
    by_lower = {name.lower(): name for name in fields}
    out: dict[str, Any] = {
        name: {_STRING: "", _UINT64: 0, _BOOL: False, _MAP: None, _STEPS: None, _BOOTDISK: None, _RAW: None}[kind]
        for name, kind in fields.items()
    }
    for key, value in obj.items():
        name = by_lower.get(key.lower())
        if name is None or value is None:
            continue  # unknown fields are ignored; null leaves the zero value
        kind = fields[name]
        if kind == _STRING and not isinstance(value, str):
            raise _mismatch(value, struct, name, "string")
        if kind == _UINT64 and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise _mismatch(value, struct, name, "uint64")
        if kind == _BOOL and not isinstance(value, bool):
            raise _mismatch(value, struct, name, "bool")
        if kind == _MAP:
            if not isinstance(value, dict):
                raise _mismatch(value, struct, name, "map[string]string")
            for item in value.values():
                if not isinstance(item, str):
                    raise _mismatch(item, struct, name, "string")
        if kind == _BOOTDISK:
            value = _struct(value, "BootDiskConfig", _BOOT_DISK)
        if kind == _STEPS:
            if not isinstance(value, list):
                raise _mismatch(value, struct, name, "[]provisioner.StepConfig")
            value = [_struct(item, "StepConfig", _STEP_CONFIG) for item in value]
        out[name] = value
    return out


def read_config(text: str) -> dict[str, Any]:
    """The Config and its parsed steps as the original's provisioner has them, or GoDecodeError."""
    config = _struct(json.loads(text), "Config", _CONFIG)
    steps = []
    for index, step in enumerate(config["Steps"] or []):
        if step["Type"] not in _STEP_TYPES:
            raise GoDecodeError(f"error parsing step {index} ({step['Type']}): unknown step type: {step['Type']!r}")
        spec = _STEP_TYPES[step["Type"]]
        try:
            args = _struct(step["Args"], *spec) if spec else {}
        except GoDecodeError as err:
            raise GoDecodeError(f"error parsing step {index} ({step['Type']}): {err}") from None
        steps.append({"Type": step["Type"], "Args": args})
    return {**config, "Steps": steps}


def run_script_environ(args: dict[str, Any]) -> list[str]:
    """What the original appends to the script's environment: strings.Split(Env, ",")."""
    return str(args["Env"]).split(",")
