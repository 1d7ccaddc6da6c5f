"""The qemu executor's local resources: the real rendered build-image workflow run by daisy_local with the
resource handlers, and stand-ins only for the two steps that need a guest (CreateInstances, WaitForInstancesSignal).
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cos_customizer import images
from cos_customizer.disk import gpt
from cos_customizer.executors import disks, startup, workflow
from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.executors.qemu import daisy as daisy_local
from cos_customizer.executors.qemu import resources as qemu_resources
from cos_customizer.executors.qemu.boot import InstanceSpec, Qmp, qemu_argv
from cos_customizer.images import ImageFormat
from cos_customizer.sample import image as sample_image
from tests.unit import test_workflow as rendering
from tests.unix_http import UnixHTTPConnection

GB = 1 << 30


@dataclass(frozen=True)
class Inputs:
    sample: Path
    cidata: Path  # the real disks.cidata_disk .tar.gz
    cidata_raw: bytes  # the disk.raw inside it
    scratch: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    work = tmp_path_factory.mktemp("inputs")
    binary = work / "provisioner-binary"
    binary.write_bytes(b"\x7fELF stand-in provisioner\n")
    config = rendering.provisioner_config(gpu=True, reclaim=False, oem="")
    cidata = disks.cidata_disk(work, binary, config)
    scratch = disks.scratch_disk(work)
    sample = sample_image.build(work / "source.img").path
    return Inputs(sample, cidata, (work / "cidata" / "disk.raw").read_bytes(), scratch)


@dataclass
class Seen:
    """What the stand-ins saw while the workflow ran (the disks are gone after it)."""

    instances: dict[str, qemu_resources.Instance] = field(default_factory=dict)
    disks: dict[str, int] = field(default_factory=dict)  # size of each disk file before the image step
    boot_table: gpt.Table | None = None
    cidata_head: bytes = b""
    daisy_end: str = ""
    metadata_sockets: list[Path] = field(default_factory=list)  # the unix socket of each metadata server
    events: list[str] = field(default_factory=list)


def standins(resources: qemu_resources.Resources, seen: Seen, fail: str = "") -> dict[str, daisy_local.Handler]:
    def create_instances(step: str, body: Any, context: daisy_local.StepContext) -> None:
        for spec in body:
            disks = tuple(disk["Source"] for disk in spec["Disks"])
            instance = resources.add_instance(spec["Name"], disks, spec["Metadata"], context)
            seen.instances[spec["Name"]] = instance
            seen.metadata_sockets.append(instance.metadata.socket)

    def wait(step: str, body: Any, context: daisy_local.StepContext) -> None:
        if step == fail:
            raise RuntimeError("BuildFailed: boom")
        if step != "wait-vm-shutdown":
            return
        seen.disks = {name: path.stat().st_size for name, path in resources.disks.items()}
        seen.boot_table = gpt.read_table(resources.disks["boot-disk"])
        with open(resources.disks["cidata-disk"], "rb") as disk:
            seen.cidata_head = disk.read(1 << 26)
        server = seen.instances["preload-vm"].metadata
        connection = UnixHTTPConnection(server.socket, timeout=10)
        try:
            connection.request("GET", "/computeMetadata/v1/instance/attributes/DaisyEnd",
                               headers={"Metadata-Flavor": "Google"})  # fmt: skip
            seen.daisy_end = connection.getresponse().read().decode()
        finally:
            connection.close()

    return {**resources.handlers(), "CreateInstances": create_instances, "WaitForInstancesSignal": wait}


def run_build(
    tmp: Path, inputs: Inputs, seen: Seen, *, resize: bool, fmt: ImageFormat, out: Path, fail: str = ""
) -> None:
    # resize: the disk is made at 10 GB and grown mid-build to 20; else it is made at 12 GB at once.
    build = rendering.build_config(DiskSize=20 if resize else 12)
    config = rendering.provisioner_config(gpu=not resize, reclaim=False, oem="1023M" if resize else "")
    cloud = tmp / "startup.yaml"
    cloud.write_text(startup.cloud_config())
    image = workflow.OutputImage("out", "out-proj")
    document = workflow.workflow(build, config, image, str(cloud))
    assert ("ResizeDisks" in document["Steps"]["resize-disk"]) == resize
    args = workflow.daisy_args(build, config, rendering.SOURCE, image, cidata=str(inputs.cidata),
                               scratch=str(inputs.scratch), workflow_path=str(tmp / "wf.json"))  # fmt: skip
    variables = {a.removeprefix("-var:"): args[i + 1] for i, a in enumerate(args) if a.startswith("-var:")}
    with qemu_resources.Resources(
        tmp / "work",
        gcs_path=args[args.index("-gcs_path") + 1],
        output_path=out,
        output_format=fmt,
        source_images={variables["source_image"]: inputs.sample},
    ) as resources:
        wf = daisy_local.load(document, variables, workflow_dir=tmp, autovars=resources.autovars())
        resources.upload_sources(wf)
        daisy_local.run(wf, standins(resources, seen, fail), default_timeout=120.0, deadline=None,
                        on_event=lambda e: seen.events.append(str(e)))  # fmt: skip


def assert_nothing_left(tmp: Path, out: Path, seen: Seen) -> None:
    assert list((tmp / "work").iterdir()) == []
    assert [p.name for p in (tmp / "out").rglob("*")] == ([out.name] if out.exists() else [])
    assert seen.metadata_sockets
    for path in seen.metadata_sockets:  # the metadata servers are closed, their private directories gone
        assert not path.parent.exists()
        with pytest.raises(OSError):
            UnixHTTPConnection(path, timeout=5).connect()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "work").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path, tmp_path / "out"


@pytest.mark.parametrize("fmt", [ImageFormat.RAW, ImageFormat.TAR_GZ])
@pytest.mark.parametrize("resize", [False, True])
def test_the_build_image_workflow_runs_on_local_resources(
    dirs: tuple[Path, Path], inputs: Inputs, resize: bool, fmt: ImageFormat
) -> None:
    tmp, out_dir = dirs
    out = out_dir / f"image.{fmt}"
    seen = Seen()
    run_build(tmp, inputs, seen, resize=resize, fmt=fmt, out=out)
    # The boot disk: the sample at the requested size, grown by the resize step when there is one.
    assert seen.disks["boot-disk"] == (20 if resize else 12) * GB
    assert seen.boot_table == gpt.read_table(inputs.sample)
    # CIDATA and SCRATCH images from the real tar.gz files; their disks are the image rounded up to whole GB.
    assert seen.disks["cidata-disk"] == GB
    assert seen.cidata_head[: len(inputs.cidata_raw)] == inputs.cidata_raw
    if resize:
        assert "scratch-disk" not in seen.disks
    else:
        assert seen.disks["scratch-disk"] == 10 * GB
    # The instance got the workflow's metadata, and the update reached its metadata server.
    attributes = seen.instances["preload-vm"].metadata.attributes()
    assert attributes["user-data"] == startup.cloud_config()
    assert attributes["DaisyEnd"] == seen.daisy_end == "ack"
    assert seen.instances["preload-vm"].disks[0] == "boot-disk"
    # The output: the boot disk in the requested format, kept (NoCleanup).
    assert images.detect(out) is fmt
    assert images.read_source_table(out) == seen.boot_table
    if fmt is ImageFormat.RAW:
        assert out.stat().st_size == seen.disks["boot-disk"]
    else:
        with tarfile.open(out) as tar:
            assert [(m.name, m.size) for m in tar.getmembers()] == [("disk.raw", seen.disks["boot-disk"])]
    assert "step image (CreateImages) finished" in seen.events
    assert_nothing_left(tmp, out, seen)


@pytest.mark.parametrize("where", ["wait-preload-finished", "image"])
def test_a_failed_run_leaves_nothing(dirs: tuple[Path, Path], inputs: Inputs, where: str) -> None:
    tmp, out_dir = dirs
    # The image step fails when the output's directory is missing (after its working copy was made).
    out = out_dir / "missing" / "image.raw" if where == "image" else out_dir / "image.raw"
    seen = Seen()
    with pytest.raises(daisy_local.WorkflowStepFailed) as err:
        run_build(tmp, inputs, seen, resize=True, fmt=ImageFormat.RAW, out=out, fail=where)
    assert err.value.step.name == where
    if where == "image":
        assert "No such file or directory" in err.value.reason and str(out) in err.value.reason
    else:
        assert err.value.reason == "BuildFailed: boom"
    assert not out.exists()
    assert_nothing_left(tmp, out, seen)


# ---------------------------------------------------------------------------------------------------------------
# ResizeDisks on a running instance: QMP block_resize (QEMU paused before its first instruction).


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qr.") as path:
        yield Path(path)


def test_resize_of_a_running_instance_goes_through_qmp(short_dir: Path) -> None:
    if shutil.which(qemu_boot.QEMU) is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup installs qemu-system-x86)")
    (short_dir / "work").mkdir()
    sizes: dict[str, int] = {}
    document = {
        "Name": "resize",
        "Steps": {
            "setup": {"CreateDisks": [{"Name": "boot-disk", "SizeGb": "1"}]},
            "run": {"CreateInstances": [{"Name": "vm", "Disks": [{"Source": "boot-disk"}]}]},
            "grow": {"ResizeDisks": [{"Name": "boot-disk", "SizeGb": "2"}]},
            "image": {"CreateImages": [{"Name": "out", "SourceDisk": "boot-disk"}]},
        },
        "Dependencies": {"run": ["setup"], "grow": ["run"], "image": ["grow"]},
    }
    with qemu_resources.Resources(short_dir / "work", gcs_path="gs://bucket/dir", output_path=short_dir / "out.raw",
                                  output_format=ImageFormat.RAW) as resources:  # fmt: skip

        def create_instances(step: str, body: Any, context: daisy_local.StepContext) -> None:
            instance = resources.add_instance("vm", ("boot-disk",), {}, context)
            spec = InstanceSpec(disks=(resources.disks["boot-disk"],), serial_port3=short_dir / "port3",
                                qmp_socket=short_dir / "qmp", metadata_socket=instance.metadata.socket,
                                memory_mb=128, cpus=1)  # fmt: skip
            proc = subprocess.Popen([*qemu_argv(spec), "-S"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            def stop() -> None:
                proc.kill()
                proc.wait()

            context.add_cleanup("stop vm", stop)
            instance.qmp = Qmp.connect(spec.qmp_socket, alive=lambda: proc.poll() is None)
            instance.running = lambda: proc.poll() is None
            sizes["before"] = resources.disks["boot-disk"].stat().st_size

        def after_grow(step: str, body: Any, context: daisy_local.StepContext) -> None:
            instance = resources.instances["vm"]
            assert instance.qmp is not None
            with instance.lock:
                block = instance.qmp.execute("query-block")[0]
            sizes["qemu"] = block["inserted"]["image"]["virtual-size"]
            sizes["file"] = resources.disks["boot-disk"].stat().st_size
            resources.create_images(step, body, context)

        wf = daisy_local.load(document, {}, autovars=resources.autovars())
        handlers = {**resources.handlers(), "CreateInstances": create_instances, "CreateImages": after_grow}
        with pytest.raises(daisy_local.WorkflowStepFailed, match="in use by the running instance vm"):
            daisy_local.run(wf, handlers, default_timeout=60.0, deadline=None, on_event=lambda e: None)
    assert sizes == {"before": GB, "qemu": 2 * GB, "file": 2 * GB}
    assert not (short_dir / "out.raw").exists()
    assert list((short_dir / "work").iterdir()) == []
