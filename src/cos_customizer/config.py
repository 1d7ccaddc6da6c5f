"""The workspace's source-image and build configs (pydantic models).

Field names follow the Go original's JSON so the files stay recognisable.
The provisioner config lives in `cos_customizer.provisioner.config`, since
it must also load on the preload VM with the standard library only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
