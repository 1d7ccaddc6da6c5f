"""The workspace's source-image and build configs (pydantic models).

Field names follow the Go original's JSON so the files stay recognisable.
The provisioner config lives in `cos_customizer.provisioner.config`, since
it must also load on the preload VM with the standard library only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


class _Model(BaseModel):
    """Read as Go's encoding/json reads the original's files: keys matched without regard to case, unknown keys
    ignored, `null` meaning the zero value; so either tool reads the other's workspace."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _as_go_reads(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = {name.lower(): name for name in cls.model_fields}
        read: dict[str, Any] = {}
        for key, value in data.items():
            name = fields.get(str(key).lower())
            if name is not None and value is not None:
                read[name] = value
        return read


class SourceImage(_Model):
    """The image to customize.

    For a GCE build, `Name`/`Project` name a Compute Engine image; `Family`
    and `Milestone` record how it was asked for. For a local build,
    `ImageFile` is the absolute path of the disk image file.
    """

    Name: str = ""
    Project: str = ""
    Family: str = ""
    Milestone: int = 0
    ImageFile: str = ""

    @property
    def is_local(self) -> bool:
        return bool(self.ImageFile)

    @property
    def url(self) -> str:
        return f"projects/{self.Project}/global/images/{self.Name}"

    @model_serializer(mode="plain")
    def _as_the_original_writes(self) -> dict[str, Any]:
        """The original's shape, `{"Project", "name"}` (a compute.Image with its Project), plus ours when set:
        the original ignores `Milestone` and `ImageFile`, and `Family` fills a field it does not use."""
        data: dict[str, Any] = {"Project": self.Project, "name": self.Name}
        extras = {"Family": self.Family, "Milestone": self.Milestone, "ImageFile": self.ImageFile}
        data.update({key: value for key, value in extras.items() if value})
        return data

    def describe(self) -> str:
        if self.ImageFile:
            return self.ImageFile
        if self.Name and self.Milestone:
            return f"{self.Project}/{self.Name} (the highest build number on milestone {self.Milestone} at start)"
        if self.Name:
            return f"{self.Project}/{self.Name}"
        if self.Family:
            return f"{self.Project}, family {self.Family} (not resolved yet)"
        return f"{self.Project}, milestone {self.Milestone} (not resolved yet)"


class BuildConfig(_Model):
    """What resources the build uses and where (the Go original's `config.Build`)."""

    GCSBucket: str = ""
    GCSDir: str = ""
    Project: str = ""
    Zone: str = ""
    MachineType: str = ""
    ServiceAccount: str = ""
    DiskType: str = ""
    DiskSize: int = Field(default=0, ge=0)
    GPUType: str = ""
    Timeout: str = ""
    GCSFiles: tuple[str, ...] = ()
    GCEEndpoint: str = ""
    Network: str = ""
    Subnet: str = ""
