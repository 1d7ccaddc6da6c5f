"""The local resources of a rehearsed GCE build, and the Daisy steps that need no running guest.

`Resources` owns one private working directory (made under a directory the caller chooses, removed
by `close()`) holding everything the workflow makes:

- `gcs/BUCKET/OBJECT`: the GCS stand-in, a plain directory tree, one file per object. Product code
  cannot use the gcp-storage-emulator package (a dev dependency, and it keeps objects in its own
  `.meta` format), and what Daisy does with GCS here (upload the sources to `${SOURCESPATH}`,
  `CopyGCSObjects`, read `RawDisk.Source`) is file copies. Serving this tree to the guest (with the
  metadata server's token) is the job of whoever starts the guest.
- `images/NAME.raw`, `disks/NAME.raw`: sparse raw files, by Daisy name;
- one `MetadataServer` per instance, and per instance the QMP client and "is it running" that
  `CreateInstances` fills in once QEMU runs (`add_instance`). Each metadata server listens on a
  unix socket in a private directory made under `sockets` (the caller's short 0700 run directory;
  `loopback_http`), never on a TCP port: its token opens the GCS tree, build context included.

`handlers()` gives the `daisy_local` handlers of the step types below; `CreateInstances` and
`WaitForInstancesSignal` belong to the QEMU side. Fields honoured (from compute-daisy's step files
and the Compute API they call); any other field is ignored as having no local meaning (Type,
Project, Zone, labels, description, family, licenses), except those that would change the result
(ACLRules, SourceSnapshot, SourceImage of an image, ForceCreate), which are refused by name:

- CopyGCSObjects `[{Source, Destination}]`: gs:// URLs; a Source whose object is empty or ends in
  "/" copies every object under that prefix, as Daisy's `recursiveGCS` does.
- CreateImages `[{Name, RealName, RawDisk: {Source}, SourceDisk, NoCleanup}]`: from `RawDisk.Source`
  (a gs:// object or a workflow source name; it must be a GCE `.tar.gz` holding `disk.raw`, which
  `images.working_copy` extracts sparse and safely); from `SourceDisk` (a disk of this workflow, not
  attached to a running instance): the build's output file in the requested format
  (`output.write`). An image without `NoCleanup` is deleted at the end, as Daisy deletes it.
- CreateDisks `[{Name, SourceImage, SizeGb}]`: `SourceImage` is an image of this workflow or one
  of the source images the caller registered (the build's source image, by the value its
  `source_image` var has); without `SizeGb` the disk is the image's size rounded up to whole GB, as
  GCE sizes it; a `SizeGb` smaller than the image is refused, as GCE refuses it.
- ResizeDisks `[{Name, SizeGb}]`: growing only (GCE cannot shrink a disk); through QMP
  `block_resize` when an instance using the disk runs, else by extending the file.
- UpdateInstancesMetadata `[{Instance, Metadata}]`: merged into the instance's metadata server.

The build-image workflow has no DeleteResources step; Daisy's own deletion at the end of a run is
done by the cleanups each handler registers (and `close()` removes whatever is left).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from cos_customizer import images, output
from cos_customizer.disk import mover
from cos_customizer.errors import CustomizerError
from cos_customizer.executors.qemu import daisy as daisy_local
from cos_customizer.executors.qemu.boot import Qmp
from cos_customizer.executors.qemu.daisy import Handler, StepContext
from cos_customizer.executors.qemu.metadata_server import MetadataServer
from cos_customizer.images import ImageFormat

GB = 1 << 30  # GCE's "GB" is a GiB
BUCKET = re.compile(r"[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]")


class ResourceError(CustomizerError):
    """A step asked for something the local resources cannot do or do not have."""


_field = daisy_local.field
_entries = functools.partial(daisy_local.entries, error=ResourceError)


@dataclasses.dataclass
class Instance:
    """A running (or stopped) instance as the other steps need it; `CreateInstances` sets `qmp` and `running`."""

    name: str
    disks: tuple[str, ...]  # Daisy disk names, boot disk first: QEMU's drives d0, d1, ...
    metadata: MetadataServer
    qmp: Qmp | None = None
    running: Callable[[], bool] = lambda: False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one QMP command at a time


def _refuse(spec: Mapping[str, Any], step: str, *names: str) -> None:
    for name in names:
        if _field(spec, name):
            raise ResourceError(f"{step}: {name} is not supported by the qemu executor")


def _size_gb(value: Any, what: str) -> int:
    try:
        size = int(str(value))
    except ValueError:
        raise ResourceError(f"{what}: cannot parse SizeGb: {value!r}") from None
    if size <= 0:
        raise ResourceError(f"{what}: SizeGb must be a positive number of GB, not {value!r}")
    return size


def _remove(path: Path) -> Callable[[], None]:
    return lambda: path.unlink(missing_ok=True)


class Resources:
    """Images, disks, GCS, metadata servers and QMP clients of one local workflow run; a context manager."""

    def __init__(
        self,
        parent: Path,
        *,
        gcs_path: str,
        output_path: Path,
        output_format: ImageFormat,
        source_images: Mapping[str, Path] = {},  # read only
        project: str = "cos-customizer-local",
        zone: str = "local-zone-a",
        token: str = "",
        sockets: Path | None = None,
    ) -> None:
        self.sockets = sockets  # where the metadata servers' private socket directories go
        self.token = token or f"ya29.local-{uuid.uuid4().hex}"  # every instance's service-account token
        self.gcs_path = gcs_path.rstrip("/")
        bucket, _ = self._split(self.gcs_path)  # checked before anything is made
        self.workdir = Path(tempfile.mkdtemp(prefix="qemu-resources.", dir=parent))
        self.gcs = self.workdir / "gcs"
        for directory in ("gcs", "images", "disks", "output"):
            (self.workdir / directory).mkdir()
        self.output_path = output_path
        self.output_format = output_format
        self.source_images = dict(source_images)
        self.project, self.zone = project, zone
        self.images: dict[str, Path] = {}
        self.disks: dict[str, Path] = {}
        self.instances: dict[str, Instance] = {}
        self.sources: dict[str, str] = {}  # workflow source name -> its gs:// object
        self._lock = threading.Lock()
        (self.gcs / bucket).mkdir()
        self.scratch_path = f"{self.gcs_path}/daisy-local-{uuid.uuid4().hex[:8]}"

    # -- life cycle

    def __enter__(self) -> Resources:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every metadata server and QMP client and remove the working directory."""
        with self._lock:
            instances, self.instances = list(self.instances.values()), {}
        for instance in instances:
            instance.metadata.close()
            if instance.qmp is not None:
                instance.qmp.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- GCS

    def autovars(self) -> dict[str, str]:
        """Daisy's workflow autovars for `daisy_local.load`, pointing into the local GCS tree."""
        return {
            "GCSPATH": self.gcs_path,
            "SCRATCHPATH": self.scratch_path,
            "SOURCESPATH": f"{self.scratch_path}/sources",
            "LOGSPATH": f"{self.scratch_path}/logs",
            "OUTSPATH": f"{self.scratch_path}/outs",
            "PROJECT": self.project,
            "ZONE": self.zone,
        }

    def _split(self, url: str) -> tuple[str, str]:
        """(bucket, object) of a gs:// URL; the object may be empty."""
        if not url.startswith("gs://"):
            raise ResourceError(f"{url!r} is not a gs:// URL")
        bucket, _, name = url[len("gs://") :].partition("/")
        if not BUCKET.fullmatch(bucket):
            raise ResourceError(f"{url}: {bucket!r} is not a bucket name")
        return bucket, name

    def gcs_file(self, url: str) -> Path:
        """The file that holds the object `url` (gs://BUCKET/OBJECT)."""
        bucket, name = self._split(url)
        parts = name.split("/")
        if not name or any(part in ("", ".", "..") for part in parts) or "\0" in name:
            raise ResourceError(f"{url}: the local GCS stand-in cannot hold an object named {name!r}")
        return self.gcs.joinpath(bucket, *parts)

    def _bucket_dir(self, bucket: str) -> Path:
        directory = self.gcs / bucket
        if not directory.is_dir():
            raise ResourceError(f"bucket {bucket!r} does not exist")
        return directory

    def _objects(self, url: str) -> Iterator[tuple[str, Path]]:
        """(name relative to the prefix, file) of every object under the prefix `url`."""
        bucket, prefix = self._split(url)
        root = self._bucket_dir(bucket)
        for path in sorted(root.rglob("*")):
            name = path.relative_to(root).as_posix()
            if path.is_file() and name.startswith(prefix):
                yield name[len(prefix) :], path

    def upload(self, source: Path, url: str) -> None:
        """Put the local file `source` at the object `url` (what the GCE build uploads before daisy runs)."""
        self._put(source, url, None)

    def _put(self, source: Path, url: str, context: StepContext | None) -> None:
        target = self.gcs_file(url)
        self._bucket_dir(self._split(url)[0])
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            shutil.copyfile(source, partial)
            partial.replace(target)
        except OSError as err:
            raise ResourceError(f"cannot write {url}: {err.strerror}") from err
        if context is not None:
            context.add_cleanup(f"delete {url}", _remove(target))

    def upload_sources(self, workflow: daisy_local.Workflow) -> None:
        """Daisy's `uploadSources`: each source becomes the object `${SOURCESPATH}/NAME` (a directory, its files)."""
        sources = self.autovars()["SOURCESPATH"]
        for name, path in workflow.sources.items():
            if not path:
                continue
            if path.startswith("gs://") and not path.endswith("/") and self._split(path)[1]:
                self._put(self.gcs_file(path), f"{sources}/{name}", None)
            elif path.startswith("gs://"):
                for rest, file in self._objects(path):
                    self._put(file, f"{sources}/{name}{'/' + rest if rest else ''}", None)
            elif Path(path).is_dir():
                for file in sorted(Path(path).rglob("*")):
                    if file.is_file():
                        self._put(file, f"{sources}/{name}/{file.relative_to(path).as_posix()}", None)
            else:
                self._put(Path(path), f"{sources}/{name}", None)
            self.sources[name] = f"{sources}/{name}"

    # -- instances (created by CreateInstances)

    def add_instance(
        self, name: str, disks: tuple[str, ...], attributes: Mapping[str, str], context: StepContext
    ) -> Instance:
        """Register an instance using `disks` and start its metadata server; both go at the end of the run."""
        for disk in disks:
            self._disk(disk, f"instance {name}")
        server = MetadataServer(attributes, project_id=self.project, zone=self.zone, name=name, token=self.token,
                                socket_parent=self.sockets)  # fmt: skip
        server.start()
        instance = Instance(name, disks, server)
        with self._lock:
            if name in self.instances:
                server.close()
                raise ResourceError(f"instance {name} already exists")
            self.instances[name] = instance

        def delete() -> None:
            with self._lock:
                self.instances.pop(name, None)
            server.close()
            if instance.qmp is not None:
                instance.qmp.close()

        context.add_cleanup(f"delete instance {name}", delete)
        return instance

    def _instance(self, name: str, what: str) -> Instance:
        with self._lock:
            found = self.instances.get(name)
        if found is None:
            raise ResourceError(f"{what}: instance {name!r} does not exist")
        return found

    def _user(self, disk: str) -> tuple[Instance, int] | None:
        """The running instance using `disk`, and the disk's index among its drives."""
        with self._lock:
            instances = list(self.instances.values())
        for instance in instances:
            if disk in instance.disks and instance.running():
                return instance, instance.disks.index(disk)
        return None

    def _disk(self, name: str, what: str) -> Path:
        with self._lock:
            found = self.disks.get(name)
        if found is None:
            raise ResourceError(f"{what}: disk {name!r} does not exist")
        return found

    # -- handlers

    def handlers(self) -> dict[str, Handler]:
        return {
            "CopyGCSObjects": self.copy_gcs_objects,
            "CreateImages": self.create_images,
            "CreateDisks": self.create_disks,
            "ResizeDisks": self.resize_disks,
            "UpdateInstancesMetadata": self.update_instances_metadata,
        }

    def copy_gcs_objects(self, step: str, body: Any, context: StepContext) -> None:
        for spec in _entries(body, step):
            _refuse(spec, step, "ACLRules")
            source, destination = str(_field(spec, "Source") or ""), str(_field(spec, "Destination") or "")
            if context.cancel.is_set():
                return
            _, name = self._split(source)
            if name == "" or name.endswith("/"):
                found = list(self._objects(source))
                if not found:
                    raise ResourceError(f"error copying from {source} to {destination}: no objects")
                for rest, file in found:
                    self._put(file, destination.rstrip("/") + "/" + rest, context)
                continue
            file = self.gcs_file(source)
            if not file.is_file():
                raise ResourceError(f"error copying from {source} to {destination}: object doesn't exist")
            self._put(file, destination, context)

    def create_images(self, step: str, body: Any, context: StepContext) -> None:
        for spec in _entries(body, step):
            _refuse(spec, step, "SourceImage", "ForceCreate")
            if context.cancel.is_set():
                return
            name = str(_field(spec, "Name") or _field(spec, "RealName") or "")
            raw, disk = _field(spec, "RawDisk"), str(_field(spec, "SourceDisk") or "")
            if bool(raw) == bool(disk):
                raise ResourceError(f"{step}: image {name!r}: give either SourceDisk or RawDisk, exclusively")
            if raw:
                self._image_from_raw_disk(name, str(_field(raw, "Source") or ""), context)
            else:
                self._image_from_disk(name, disk, bool(_field(spec, "NoCleanup")), context)

    def _image_from_raw_disk(self, name: str, source: str, context: StepContext) -> None:
        url = self.sources.get(source, source)
        archive = self.gcs_file(url)
        if not archive.is_file():
            raise ResourceError(f"image {name}: RawDisk.Source {source}: object doesn't exist")
        if images.detect(archive) is not ImageFormat.TAR_GZ:
            raise ResourceError(f"image {name}: RawDisk.Source {source} is not a .tar.gz holding disk.raw")
        target = self.workdir / "images" / f"{name}.raw"
        with self._lock:
            if name in self.images:
                raise ResourceError(f"image {name} already exists")
            self.images[name] = target
        context.add_cleanup(f"delete image {name}", _remove(target))
        images.working_copy(archive, target)

    def _image_from_disk(self, name: str, disk: str, keep: bool, context: StepContext) -> None:
        source = self._disk(disk, f"image {name}")
        user = self._user(disk)
        if user is not None:
            raise ResourceError(f"image {name}: disk {disk} is in use by the running instance {user[0].name}")
        copy = self.workdir / "output" / "disk.raw"
        if copy.exists():
            raise ResourceError(f"image {name}: the qemu executor writes one output image per run")
        try:
            images.working_copy(source, copy)
            # Zero blocks become holes: the guest's kernel zeroes new inode tables with SCSI WRITE SAME (no
            # unmap), which QEMU keeps as allocated zeros; Compute's image holds data, zeros cost it nothing.
            mover.sparsify(copy)
            output.write(copy, self.output_path, self.output_format)
        finally:
            copy.unlink(missing_ok=True)
        if not keep:  # Daisy deletes an image it made unless NoCleanup
            context.add_cleanup(f"delete image {name} ({self.output_path})", _remove(self.output_path))

    def _source_image(self, name: str, what: str) -> tuple[Path, bool]:
        """The file of image `name`, and whether it must be converted (an external source of any format)."""
        with self._lock:
            local = self.images.get(name)
        if local is not None:
            return local, False
        if name in self.source_images:
            return self.source_images[name], True
        raise ResourceError(f"{what}: image {name!r} does not exist")

    def create_disks(self, step: str, body: Any, context: StepContext) -> None:
        for spec in _entries(body, step):
            _refuse(spec, step, "SourceSnapshot")
            if context.cancel.is_set():
                return
            name = str(_field(spec, "Name") or "")
            what = f"cannot create disk {name!r}"
            image, size_gb = str(_field(spec, "SourceImage") or ""), _field(spec, "SizeGb")
            if not image and not size_gb:
                raise ResourceError(f"{what}: SizeGb, SourceSnapshot or SourceImage not set")
            target = self.workdir / "disks" / f"{name}.raw"
            with self._lock:
                if name in self.disks:
                    raise ResourceError(f"{what}: it already exists")
            context.add_cleanup(f"delete disk {name}", _remove(target))
            image_size = 0
            if image:
                path, external = self._source_image(image, what)
                if external:
                    images.working_copy(path, target)
                else:
                    with open(path, "rb") as src, open(target, "wb") as dst:
                        output.sparse_copy(src.fileno(), dst.fileno())
                image_size = target.stat().st_size
            size = _size_gb(size_gb, what) * GB if size_gb else -(-image_size // GB) * GB
            if size < image_size:
                raise ResourceError(
                    f"{what}: requested disk size cannot be smaller than the image size ({image_size} bytes)"
                )
            with open(target, "ab") as disk:
                disk.truncate(size)
            with self._lock:
                self.disks[name] = target

    def resize_disks(self, step: str, body: Any, context: StepContext) -> None:
        for spec in _entries(body, step):
            name = str(_field(spec, "Name") or "")
            what = f"cannot resize disk {name!r}"
            path = self._disk(name, what)
            size = _size_gb(_field(spec, "SizeGb"), what) * GB
            current = path.stat().st_size
            if size < current:
                raise ResourceError(f"{what}: a disk can only grow ({size} bytes requested, {current} now)")
            user = self._user(name)
            if user is None:
                with open(path, "r+b") as disk:
                    disk.truncate(size)
                continue
            instance, index = user
            if instance.qmp is None:
                raise ResourceError(f"{what}: instance {instance.name} runs without a QMP connection")
            with instance.lock:
                instance.qmp.block_resize(f"d{index}", size)

    def update_instances_metadata(self, step: str, body: Any, context: StepContext) -> None:
        for spec in _entries(body, step):
            name = str(_field(spec, "Instance") or "")
            metadata = _field(spec, "Metadata")
            if not isinstance(metadata, dict) or not metadata:
                raise ResourceError(f"Instance {name}: Metadata must contain at least one value to update")
            instance = self._instance(name, "cannot set metadata")
            instance.metadata.set_attributes({str(key): str(value) for key, value in metadata.items()})
