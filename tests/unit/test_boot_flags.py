"""`cos-customizer boot`'s flags: every bad input is one line and exit 2, found before anything boots."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cos_customizer.cli import boot
from cos_customizer.cli.flags import parse
from cos_customizer.disk import gpt
from cos_customizer.executors.qemu import boot as qemu_boot
from cos_customizer.executors.qemu import daisy as daisy_local
from cos_customizer.executors.qemu import vm
from tests.conftest import CLI


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small disk with a GPT (the command reads the table before anything runs)."""
    path = tmp_path / "cos.raw"
    path.write_bytes(bytes(4 << 20))
    partition = gpt.Partition(1, gpt.LINUX_DATA, uuid.uuid4(), 2048, 4095, name="STATE")
    gpt.write_table(path, gpt.new_table(8192, [partition]))
    return path


def _refused(cli: CLI, *argv: str) -> str:
    result = cli("boot", *argv)
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cos-customizer: error: "), result.err
    return lines[0].removeprefix("cos-customizer: error: ")


def test_the_image_file_is_required(cli: CLI) -> None:
    assert _refused(cli, "-success-match=OK").startswith("-image-file=IMAGE must be set")


def test_a_missing_or_odd_image_file_is_refused(cli: CLI, tmp_path: Path) -> None:
    assert _refused(cli, f"-image-file={tmp_path / 'nope.raw'}", "-success-match=OK").endswith("does not exist")
    assert "is a directory, not a disk image file" in _refused(cli, f"-image-file={tmp_path}", "-success-match=OK")
    text = tmp_path / "notes.txt"
    text.write_text("not a disk\n" * 1000)
    message = _refused(cli, f"-image-file={text}", "-success-match=OK")
    assert message.startswith(f"-image-file: {text} is not a GPT disk"), message


@pytest.mark.parametrize("port", ["0", "5", "-1"])
def test_the_serial_port_is_one_to_four(cli: CLI, image: Path, port: str) -> None:
    message = _refused(cli, f"-image-file={image}", "-success-match=OK", f"-serial-port={port}")
    assert message == f"-serial-port={port}: GCE's serial ports are 1 to 4"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("-failure-match=X", "-failure-match needs -success-match: without it boot is an interactive console"),
        ("-status-match=X", "-status-match needs -success-match: without it boot is an interactive console"),
        ("-serial-port=2", "-serial-port=2 needs -success-match: the interactive console is serial port 1"),
    ],
)
def test_the_console_takes_no_matches_and_only_port_1(cli: CLI, image: Path, flag: str, message: str) -> None:
    assert _refused(cli, f"-image-file={image}", flag) == message


def test_the_console_waits_a_day_unless_told(image: Path) -> None:
    console = boot.job_from(parse(boot.COMMAND.flags, [f"-image-file={image}"], command="boot"))
    assert (console.console, console.timeout) == (True, 24 * 3600.0)
    told = boot.job_from(parse(boot.COMMAND.flags, [f"-image-file={image}", "-timeout=1h"], command="boot"))
    assert (told.console, told.timeout) == (True, 3600.0)
    matched = boot.job_from(parse(boot.COMMAND.flags, [f"-image-file={image}", "-success-match=OK"], command="boot"))
    assert (matched.console, matched.timeout) == (False, 600.0)


@pytest.mark.parametrize("timeout", ["0s", "-1m"])
def test_the_timeout_is_positive(cli: CLI, image: Path, timeout: str) -> None:
    message = _refused(cli, f"-image-file={image}", "-success-match=OK", f"-timeout={timeout}")
    assert message.startswith("-timeout must be a positive duration")


def test_the_hang_timeout_is_not_negative(cli: CLI, image: Path) -> None:
    message = _refused(cli, f"-image-file={image}", "-success-match=OK", "-hang-timeout=-1s")
    assert message == "-hang-timeout must be a duration, such as 5m, or 0 to wait for -timeout regardless"


def test_a_bad_timeout_is_a_usage_error(cli: CLI, image: Path) -> None:
    assert "-timeout" in _refused(cli, f"-image-file={image}", "-success-match=OK", "-timeout=soon")


@pytest.mark.parametrize("flag", ["-metadata=a b=1", "-metadata=é=1", f"-metadata={'k' * 129}=1"])
def test_a_metadata_key_follows_gce_rules(cli: CLI, image: Path, flag: str) -> None:
    assert "a key is 1 to 128 letters, digits" in _refused(cli, f"-image-file={image}", "-success-match=OK", flag)


def test_metadata_files_must_be_readable_utf8_text(cli: CLI, image: Path, tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    base = (f"-image-file={image}", "-success-match=OK")
    assert _refused(cli, *base, f"-user-data={tmp_path / 'none'}").endswith("does not exist")
    assert _refused(cli, *base, f"-metadata-from-file=k={binary}").endswith("is not UTF-8 text")
    assert _refused(cli, *base, f"-user-data={tmp_path}").endswith("is not a regular file")


def test_a_key_given_twice_is_refused(cli: CLI, image: Path, tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.write_text("hello")
    base = (f"-image-file={image}", "-success-match=OK")
    assert "given twice" in _refused(cli, *base, "-metadata=user-data=x", f"-user-data={text}")
    assert "both -metadata and -metadata-from-file" in _refused(
        cli, *base, "-metadata=k=x", f"-metadata-from-file=k={text}"
    )


def test_a_value_over_256_kib_is_refused(cli: CLI, image: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_text("x" * (256 * 1024 + 1))
    message = _refused(cli, f"-image-file={image}", "-success-match=OK", f"-user-data={big}")
    assert message.endswith("a value is at most 256 KiB on GCE")


def test_the_flags_make_the_job(image: Path, tmp_path: Path) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\nruncmd: [[echo, '${NOT_A_DAISY_VAR}']]\n")
    (tmp_path / "startup").write_text("echo hi")
    argv = [f"-image-file={image}", f"-user-data={user_data}", "-metadata=a=1,b=2,3", "-serial-port=2",
            f"-metadata-from-file=startup-script={tmp_path / 'startup'}", "-success-match=TestPass",
            "-failure-match=TestFail", "-status-match=TestStatus", "-timeout=90s", "-hang-timeout=0"]  # fmt: skip
    job = boot.job_from(parse(boot.COMMAND.flags, argv, command="boot"))
    assert job == vm.BootJob(
        image=image,
        metadata=(
            ("a", "1"),
            ("b", "2,3"),
            ("startup-script", "echo hi"),
            ("user-data", user_data.read_text()),
        ),
        port=2,
        success="TestPass",
        failures=("TestFail",),
        status="TestStatus",
        timeout=90.0,
        hang_timeout=0.0,
    )
    default = boot.job_from(parse(boot.COMMAND.flags, [f"-image-file={image}", "-success-match=OK"], command="boot"))
    assert default.hang_timeout == 300.0  # 5m


def test_metadata_values_reach_the_workflow_as_sources(image: Path, tmp_path: Path) -> None:
    """Each value is a Daisy source, so a `${...}` in a cloud-config is text, not a workflow var."""
    files = {"user-data": tmp_path / "m0"}
    files["user-data"].write_text("echo ${HOME}")
    job = vm.BootJob(image=image, success="OK", port=3, failures=("BAD",))
    wf = daisy_local.load(vm.document(job, files), {}, workflow_dir=tmp_path)
    assert wf.steps["run"].body[0]["Metadata"] == {"user-data": "echo ${HOME}"}
    assert wf.steps["wait"].body[0]["SerialOutput"] == {"Port": 3, "SuccessMatch": "OK", "FailureMatch": ["BAD"]}


def test_the_watched_port_is_recorded_as_ports_1_and_3_are(tmp_path: Path) -> None:
    spec = qemu_boot.InstanceSpec(disks=(tmp_path / "d",), serial_port3=tmp_path / "p3", qmp_socket=tmp_path / "q",
                                  metadata_socket=tmp_path / "m", serial_ports=((2, tmp_path / "p2"),))  # fmt: skip
    argv = qemu_boot.qemu_argv(spec)
    assert f"file,id=serial2,path={tmp_path / 'p2'}" in argv
    assert f"file,id=serial3,path={tmp_path / 'p3'}" in argv
    assert "null,id=serial1" in argv and "null,id=serial4" in argv


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        (
            "-memory=1",
            "-memory=1: give the guest's memory with its unit, from 256M to 64G in whole MiB (for example 2G)",
        ),
        (
            "-memory=100M",
            "-memory=100M: give the guest's memory with its unit, from 256M to 64G in whole MiB (for example 2G)",
        ),
        (
            "-memory=65G",
            "-memory=65G: give the guest's memory with its unit, from 256M to 64G in whole MiB (for example 2G)",
        ),
        (
            "-memory=lots",
            "-memory=lots: give the guest's memory with its unit, from 256M to 64G in whole MiB (for example 2G)",
        ),
        ("-cpus=0", "-cpus=0: give 1 to 64 virtual CPUs"),
        ("-cpus=65", "-cpus=65: give 1 to 64 virtual CPUs"),
    ],
)
def test_memory_and_cpus_are_refused_out_of_range(cli: CLI, image: Path, flag: str, expected: str) -> None:
    assert _refused(cli, f"-image-file={image}", "-success-match=OK", flag) == expected


def test_memory_and_cpus_reach_the_job(image: Path) -> None:
    argv = [f"-image-file={image}", "-success-match=OK", "-memory=512M", "-cpus=1"]
    job = boot.job_from(parse(boot.COMMAND.flags, argv, command="boot"))
    assert (job.memory_mb, job.cpus) == (512, 1)
    default = boot.job_from(parse(boot.COMMAND.flags, argv[:2], command="boot"))
    assert (default.memory_mb, default.cpus) == (2048, 2)  # the rehearsal's guest: 2 vCPUs and 2 GiB
