"""The command lines of an image's containerd and dockerd, from its systemd units (daemon_units).

Images are trees under tmp_path; binaries are files with an execute bit, never run. The parsing of
the units themselves is tested against systemd in test_systemd_units.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cos_customizer.executors.local import daemon_units as du
from cos_customizer.executors.local.daemon_units import Absent, Daemon

DOCKER_SOCKET = "/run/build/docker.sock"
CONTAINERD_SOCKET = "/run/build/containerd.sock"
HOST = f"unix://{DOCKER_SOCKET}"


# --- image trees ---------------------------------------------------------------------------------


def put(root: Path, path: str, text: str | bytes, mode: int = 0o644) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        target.write_text(text)
    else:
        target.write_bytes(text)
    target.chmod(mode)
    return target


def binary(root: Path, path: str) -> Path:
    return put(root, path, "#!/bin/false\n", 0o755)


def link(root: Path, path: str, target: str) -> None:
    where = root / path.lstrip("/")
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(target)


def resolve(root: Path) -> tuple[Daemon | Absent, ...]:
    return du.resolve_daemons(root, docker_socket=DOCKER_SOCKET, containerd_socket=CONTAINERD_SOCKET)


def found(root: Path) -> dict[str, Daemon | Absent]:
    return {d.name: d for d in resolve(root)}


def started(root: Path, name: str) -> Daemon:
    result = found(root)[name]
    assert isinstance(result, Daemon), result
    return result


@pytest.fixture
def root(tmp_path: Path) -> Path:
    image = tmp_path / "image"
    image.mkdir()
    return image


@pytest.fixture
def opened_paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every file the module opens, as the host path it really is (directory descriptors resolved)."""
    seen: list[str] = []
    real_open = os.open

    def spying_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        where = os.fspath(path)
        if dir_fd is not None and not where.startswith("/"):
            where = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), where)
        seen.append(where)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", spying_open)
    yield seen


def assert_inside(paths: list[str], root: Path) -> None:
    assert paths, "the spy saw nothing"
    for path in paths:
        assert Path(path).resolve().is_relative_to(root.resolve()), path


# --- whole images ------------------------------------------------------------------------------------

DEBIAN_UNITS = ("/lib/systemd/system/docker.service", "/lib/systemd/system/containerd.service", "/etc/default/docker")


@pytest.fixture
def debian_image(root: Path) -> Path:
    """The units and /etc/default/docker of this machine's docker.io and containerd packages."""
    if not all(Path(p).is_file() for p in DEBIAN_UNITS):
        pytest.skip("docker.io and containerd are not installed here")
    for path in DEBIAN_UNITS:
        put(root, path, Path(path).read_bytes())
    binary(root, "/usr/sbin/dockerd")
    binary(root, "/usr/bin/containerd")
    return root


def test_debians_docker_io_units(debian_image: Path) -> None:
    containerd, dockerd = resolve(debian_image)
    assert containerd == Daemon(
        "containerd", ("/usr/bin/containerd", "--address", CONTAINERD_SOCKET), {},
        "/lib/systemd/system/containerd.service", CONTAINERD_SOCKET,
    )  # fmt: skip
    # ExecStart=/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock $DOCKER_OPTS, and
    # /etc/default/docker sets nothing: $DOCKER_OPTS disappears.
    assert dockerd == Daemon(
        "dockerd", ("/usr/sbin/dockerd", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}"), {},
        "/lib/systemd/system/docker.service", DOCKER_SOCKET,
    )  # fmt: skip


def test_debians_units_with_docker_opts(debian_image: Path) -> None:
    put(
        debian_image, "/etc/default/docker",
        Path("/etc/default/docker").read_text()
        + 'DOCKER_OPTS="--dns 8.8.8.8 -H tcp://0.0.0.0:2375 --iptables=false --label \'a b\'"\n',
    )  # fmt: skip
    dockerd = started(debian_image, "dockerd")
    assert dockerd.argv == (
        "/usr/sbin/dockerd", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}",
        "--dns", "8.8.8.8", "--iptables=false", "--label", "a b",
    )  # fmt: skip
    assert dockerd.dropped == ("-H", "tcp://0.0.0.0:2375")
    assert dockerd.env["DOCKER_OPTS"].startswith("--dns 8.8.8.8")


def test_no_units_means_coss_defaults(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    binary(root, "/usr/bin/containerd")
    assert resolve(root) == (
        Daemon("containerd", ("/usr/bin/containerd", "--address", CONTAINERD_SOCKET), {}, None, CONTAINERD_SOCKET),
        Daemon(
            "dockerd",
            (
                "/usr/bin/dockerd", "--registry-mirror=https://mirror.gcr.io", f"--host={HOST}",
                f"--containerd={CONTAINERD_SOCKET}",
            ),
            {}, None, DOCKER_SOCKET,
        ),
    )  # fmt: skip


def test_coss_defaults_read_etc_default_docker(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/etc/default/docker", 'DOCKER_OPTS="--log-level=warn --host=tcp://127.0.0.1:2375"\n')
    dockerd = started(root, "dockerd")
    assert dockerd.argv[-1] == "--log-level=warn"
    assert dockerd.dropped == ("--host=tcp://127.0.0.1:2375",)
    assert dockerd.unit is None


def test_only_the_daemons_with_a_binary(root: Path) -> None:
    assert du.daemons(root, docker_socket=DOCKER_SOCKET, containerd_socket=CONTAINERD_SOCKET) == ()
    assert resolve(root) == (
        Absent("containerd", "no executable containerd in the image"),
        Absent("dockerd", "no executable dockerd in the image"),
    )
    binary(root, "/usr/sbin/dockerd")
    (only,) = du.daemons(root, docker_socket=DOCKER_SOCKET, containerd_socket=CONTAINERD_SOCKET)
    assert only.name == "dockerd"
    assert only.argv[0] == "/usr/sbin/dockerd"


def test_hosts_other_than_socket_activation_are_dropped(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(
        root, "/usr/lib/systemd/system/docker.service",
        "[Service]\nExecStart=/usr/bin/dockerd -H fd:// -H tcp://0.0.0.0:2375 --host=unix:///var/run/other.sock \\\n"
        "  -Hfd://3 --containerd /run/containerd/containerd.sock --containerd=/again --iptables=false \\\n"
        "  --bridge=none -p /var/run/docker.pid\n",
    )  # fmt: skip
    dockerd = started(root, "dockerd")
    assert dockerd.argv == (
        "/usr/bin/dockerd", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}",
        "--iptables=false", "--bridge=none", "-p", "/var/run/docker.pid",
    )  # fmt: skip
    assert dockerd.dropped == (
        "-H", "tcp://0.0.0.0:2375", "--host=unix:///var/run/other.sock", "-Hfd://3", "--containerd=/again",
    )  # fmt: skip
    assert dockerd.unit == "/usr/lib/systemd/system/docker.service"


@pytest.mark.parametrize(
    ("exec_start", "argv", "dropped"),
    [
        (
            "/usr/bin/dockerd --iptables=false",
            ("-H", HOST, f"--containerd={CONTAINERD_SOCKET}", "--iptables=false"),
            (),
        ),
        (
            "/usr/bin/dockerd --host tcp://[::]:2376 --containerd=/x",
            ("-H", HOST, f"--containerd={CONTAINERD_SOCKET}"),
            ("--host", "tcp://[::]:2376"),
        ),
        # Added options go right after argv[0].
        (f"/usr/bin/dockerd -H={HOST} -D", (f"--containerd={CONTAINERD_SOCKET}", f"-H={HOST}", "-D"), ()),
        ("/usr/bin/dockerd --host=fd:// -D -H", (f"--containerd={CONTAINERD_SOCKET}", f"--host={HOST}", "-D"), ("-H",)),
    ],
)
def test_dockerds_hosts(root: Path, exec_start: str, argv: tuple[str, ...], dropped: tuple[str, ...]) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/lib/systemd/system/docker.service", f"[Service]\nExecStart={exec_start}\n")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == ("/usr/bin/dockerd", *argv)
    assert dockerd.dropped == dropped


@pytest.mark.parametrize(
    ("exec_start", "argv"),
    [
        (
            "/usr/bin/containerd --config /etc/containerd/config.toml -a /run/x.sock --log-level debug",
            ("--config", "/etc/containerd/config.toml", "--address", CONTAINERD_SOCKET, "--log-level", "debug"),
        ),
        ("/usr/bin/containerd --address=/run/x.sock -c /c.toml", ("--address", CONTAINERD_SOCKET, "-c", "/c.toml")),
        ("/usr/bin/containerd -c /c.toml", ("--address", CONTAINERD_SOCKET, "-c", "/c.toml")),
    ],
)
def test_containerds_address(root: Path, exec_start: str, argv: tuple[str, ...]) -> None:
    binary(root, "/usr/bin/containerd")
    put(root, "/etc/systemd/system/containerd.service", f"[Service]\nExecStart={exec_start}\n")
    containerd = started(root, "containerd")
    assert containerd.argv == ("/usr/bin/containerd", *argv)
    assert containerd.socket == CONTAINERD_SOCKET


def test_environment_and_environment_files(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(
        root, "/lib/systemd/system/docker.service",
        "[Service]\nEnvironment=OPTS=--from-unit MODE=unit \"ONE=a b\"\n"
        "EnvironmentFile=-/etc/default/missing\nEnvironmentFile=/etc/docker/*.env\nEnvironmentFile=/etc/required\n"
        "ExecStart=/usr/bin/dockerd $OPTS ${ONE} --mode=${MODE} $EXTRA\n",
    )  # fmt: skip
    put(root, "/etc/docker/10.env", "MODE=file\nEXTRA='--x \"y z\"'\n")
    put(root, "/etc/docker/20.env", "MODE=later-file\n")
    put(root, "/etc/docker/.hidden.env", "MODE=hidden\n")
    dockerd = started(root, "dockerd")
    # EnvironmentFile= values override Environment= ones; files in the order given, matches sorted.
    assert dockerd.argv == (
        "/usr/bin/dockerd", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}",
        "--from-unit", "a b", "--mode=later-file", "--x", "y z",
    )  # fmt: skip
    assert dict(dockerd.env) == {"OPTS": "--from-unit", "ONE": "a b", "MODE": "later-file", "EXTRA": '--x "y z"'}
    assert any("/etc/required" in note for note in dockerd.notes)


def test_colon_prefix_turns_expansion_off(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(
        root,
        "/lib/systemd/system/docker.service",
        "[Service]\nEnvironment=A=1\nExecStart=:/usr/bin/dockerd --label=$A\n",
    )
    assert started(root, "dockerd").argv[-1] == "--label=$A"


def test_drop_ins(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd -H fd://\n")
    put(
        root, "/etc/systemd/system/docker.service.d/10-override.conf",
        "[Service]\nExecStart=\nExecStart=/usr/bin/dockerd -H tcp://0.0.0.0:2375 --iptables=false $EXTRA\n",
    )  # fmt: skip
    put(root, "/usr/lib/systemd/system/docker.service.d/10-override.conf", "[Service]\nExecStart=/usr/bin/shadowed\n")
    put(root, "/usr/lib/systemd/system/docker.service.d/20-env.conf", "[Service]\nEnvironment=EXTRA=--debug\n")
    put(root, "/usr/lib/systemd/system/docker.service.d/30-masked.conf", "[Service]\nEnvironment=EXTRA=--masked\n")
    link(root, "/etc/systemd/system/docker.service.d/30-masked.conf", "/dev/null")
    put(root, "/etc/systemd/system/docker.service.d/README", "[Service]\nExecStart=/not/a/conf\n")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == (
        "/usr/bin/dockerd",
        "-H",
        HOST,
        f"--containerd={CONTAINERD_SOCKET}",
        "--iptables=false",
        "--debug",
    )
    assert dockerd.dropped == ("-H", "tcp://0.0.0.0:2375")
    assert dockerd.unit == "/lib/systemd/system/docker.service"
    assert dockerd.dropins == (
        "/etc/systemd/system/docker.service.d/10-override.conf",
        "/usr/lib/systemd/system/docker.service.d/20-env.conf",
    )


def test_the_first_unit_directory_wins(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --from=lib\n")
    put(root, "/usr/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --from=usr-lib\n")
    assert started(root, "dockerd").argv[-1] == "--from=usr-lib"
    put(root, "/etc/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --from=etc\n")
    assert started(root, "dockerd").argv[-1] == "--from=etc"


@pytest.mark.parametrize("how", ["absolute", "relative", "empty"])
def test_masked_units(root: Path, how: str) -> None:
    binary(root, "/usr/bin/dockerd")
    binary(root, "/usr/bin/containerd")
    put(root, "/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd\n")
    if how == "empty":
        put(root, "/etc/systemd/system/docker.service", "")
    else:
        link(root, "/etc/systemd/system/docker.service", "/dev/null" if how == "absolute" else "../../../dev/null")
    containerd, dockerd = resolve(root)
    assert isinstance(containerd, Daemon)
    assert isinstance(dockerd, Absent)
    assert "masked" in dockerd.reason
    assert dockerd.unit == "/etc/systemd/system/docker.service"
    assert du.daemons(root, docker_socket=DOCKER_SOCKET, containerd_socket=CONTAINERD_SOCKET) == (containerd,)


def test_absolute_symlinks_mean_the_images_own_paths(root: Path, tmp_path: Path, opened_paths: list[str]) -> None:
    outside = put(tmp_path, "/outside/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --read-outside\n")
    binary(root, "/usr/bin/dockerd")
    # /etc/shadow is the image's (it has none), the host path of `outside` too (the image has no such path).
    link(root, "/usr/lib/systemd/system/docker.service", "/etc/shadow")
    link(root, "/etc/systemd/system/docker.service", str(outside))
    dockerd = started(root, "dockerd")
    assert dockerd.unit is None  # no unit found: COS's defaults
    assert "--read-outside" not in dockerd.argv
    assert_inside(opened_paths, root)
    put(root, "/etc/shadow", "[Service]\nExecStart=/usr/bin/dockerd --the-images-shadow\n")
    assert started(root, "dockerd").unit == "/usr/lib/systemd/system/docker.service"
    assert started(root, "dockerd").argv[-1] == "--the-images-shadow"
    assert_inside(opened_paths, root)


def test_relative_symlinks_may_not_climb_out_of_the_image(root: Path, tmp_path: Path, opened_paths: list[str]) -> None:
    put(tmp_path, "/etc/passwd", "[Service]\nExecStart=/usr/bin/dockerd --read-outside\n")
    put(tmp_path, "/outside/containerd.service", "[Service]\nExecStart=/usr/bin/containerd --read-outside\n")
    binary(root, "/usr/bin/dockerd")
    binary(root, "/usr/bin/containerd")
    # Four levels up from /usr/lib/systemd/system is the image's root: this is the image's /etc/passwd ...
    link(root, "/usr/lib/systemd/system/docker.service", "../../../../etc/passwd")
    # ... and from /lib/systemd/system (three levels) the fourth ".." would leave the image: refused.
    link(root, "/lib/systemd/system/containerd.service", "../../../../outside/containerd.service")
    containerd, dockerd = resolve(root)
    assert isinstance(containerd, Daemon) and isinstance(dockerd, Daemon)
    assert containerd.unit is None and dockerd.unit is None  # COS's defaults: no unit was read
    assert "--read-outside" not in containerd.argv + dockerd.argv
    assert any("leads above the image's root" in note for note in containerd.notes)
    assert_inside(opened_paths, root)
    put(root, "/etc/passwd", "[Service]\nExecStart=/usr/bin/dockerd --the-images-passwd\n")
    assert started(root, "dockerd").argv[-1] == "--the-images-passwd"


def test_a_directory_symlink_out_of_the_image_is_refused(root: Path, tmp_path: Path, opened_paths: list[str]) -> None:
    put(tmp_path, "/outside/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd --read-outside\n")
    put(tmp_path, "/outside/bin/dockerd", "#!/bin/false\n", 0o755)
    link(root, "/lib", "../outside")
    link(root, "/usr/lib/systemd", "../../../outside")
    link(root, "/usr/bin", "../../outside/bin")
    binary(root, "/sbin/dockerd")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == (
        "/sbin/dockerd",
        "--registry-mirror=https://mirror.gcr.io",
        f"--host={HOST}",
        f"--containerd={CONTAINERD_SOCKET}",
    )
    assert_inside(opened_paths, root)


def test_symlinks_inside_the_image_are_followed(root: Path) -> None:
    binary(root, "/usr/libexec/docker/dockerd-ce")
    link(root, "/usr/bin/dockerd", "/usr/libexec/docker/dockerd-ce")
    link(root, "/lib", "usr/lib")  # merged /usr
    put(root, "/usr/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/bin/dockerd -D\n")
    link(root, "/etc/systemd/system/docker.service", "/lib/systemd/system/docker.service")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == ("/usr/libexec/docker/dockerd-ce", "-H", HOST, f"--containerd={CONTAINERD_SOCKET}", "-D")
    assert dockerd.unit == "/etc/systemd/system/docker.service"


def test_a_symlink_loop_is_refused(root: Path) -> None:
    link(root, "/etc/systemd/system/docker.service", "docker.service")
    binary(root, "/usr/bin/dockerd")
    dockerd = started(root, "dockerd")
    assert dockerd.unit is None
    assert any("too many symlinks" in note for note in dockerd.notes)


def test_missing_binary_falls_back_to_the_path(root: Path) -> None:
    put(root, "/lib/systemd/system/docker.service", "[Service]\nExecStart=/usr/sbin/dockerd -H fd:// --debug\n")
    put(root, "/usr/sbin/dockerd", "not executable\n", 0o644)
    put(root, "/usr/bin/dockerd", "a directory is no binary either\n", 0o644)
    binary(root, "/bin/dockerd")
    dockerd = started(root, "dockerd")
    assert dockerd.argv == ("/bin/dockerd", f"--containerd={CONTAINERD_SOCKET}", "-H", HOST, "--debug")
    assert dockerd.unit == "/lib/systemd/system/docker.service"
    assert any("/usr/sbin/dockerd is not an executable" in note for note in dockerd.notes)


def test_a_bare_command_name_is_searched_as_systemd_does(root: Path) -> None:
    binary(root, "/usr/local/sbin/containerd")
    binary(root, "/usr/bin/containerd")
    put(root, "/lib/systemd/system/containerd.service", "[Service]\nExecStart=containerd\n")
    assert started(root, "containerd").argv[0] == "/usr/local/sbin/containerd"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('[Service]\nExecStart=/usr/bin/dockerd "unbalanced\n', "unbalanced quoting"),
        ("[Service]\nExecStart=/usr/bin/dockerd --host=%H\n", "%H depends on the running machine"),
        ("[Service]\nExecStart=/usr/bin/docker-wrapper --start\n", "runs /usr/bin/docker-wrapper, not dockerd"),
        ("[Unit]\nDescription=no service section\n", "no ExecStart="),
    ],
)
def test_an_unusable_unit_gives_coss_defaults_and_says_why(root: Path, text: str, why: str) -> None:
    binary(root, "/usr/bin/dockerd")
    put(root, "/lib/systemd/system/docker.service", text)
    dockerd = started(root, "dockerd")
    assert dockerd.unit is None
    assert dockerd.argv[1] == "--registry-mirror=https://mirror.gcr.io"
    assert any(why in note and "/lib/systemd/system/docker.service" in note for note in dockerd.notes), dockerd.notes


def test_odd_files_are_not_read(root: Path) -> None:
    binary(root, "/usr/bin/dockerd")
    binary(root, "/usr/bin/containerd")
    put(
        root,
        "/etc/systemd/system/docker.service",
        b"[Service]\nExecStart=/usr/bin/dockerd --big\n" + b"#" * du.MAX_FILE_SIZE,
    )
    os.mkfifo(root / "etc/systemd/system/containerd.service")  # would block a reader
    put(root, "/lib/systemd/system/containerd.service", "[Service]\nExecStart=/usr/bin/containerd --from-lib\n")
    containerd, dockerd = resolve(root)
    assert isinstance(containerd, Daemon) and isinstance(dockerd, Daemon)
    assert containerd.argv[-1] == "--from-lib"
    assert "--big" not in dockerd.argv
    assert any("larger than" in note for note in dockerd.notes)


def test_sockets_must_be_absolute(root: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        du.resolve_daemons(root, docker_socket="docker.sock", containerd_socket=CONTAINERD_SOCKET)


def test_a_daemon_is_immutable(root: Path) -> None:
    binary(root, "/usr/bin/containerd")
    containerd = started(root, "containerd")
    with pytest.raises(TypeError):
        containerd.env["X"] = "1"  # type: ignore[index]
    assert hash(containerd) == hash(started(root, "containerd"))
