"""The container runtime of `sample-image -with-containers`, copied from this machine into ROOT-A.

COS runs containerd and dockerd from its read-only root, with systemd units for them and legacy
iptables; their state (/var/lib/docker, /var/lib/containerd, /etc/docker) lives on STATE and tmpfs at
run time, so none of it is in ROOT-A. This copies Debian's docker.io, containerd, runc and iptables
binaries to the paths COS has (`BINARIES`, `XTABLES_MULTI`, `XTABLES_MODULES`) and writes the units
as COS's. `install` returns the host files whose shared libraries ROOT-A needs too;
`sample_image.root_tree` copies those (with `_libraries`). COS ships no /etc/containerd/config.toml
that we know of, so containerd runs on its defaults here as well.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cos_customizer.arch import Arch
from cos_customizer.errors import ValidationError
from cos_customizer.sample import userland as sample_userland
from cos_customizer.sample.userland import MULTIARCH

# ROOT-A path, host path (symlinks resolved when copying), Debian package that provides it.
BINARIES: tuple[tuple[str, str, str], ...] = (
    ("usr/bin/docker", "/usr/bin/docker", "docker.io"),  # never /usr/local/bin/docker: another client
    ("usr/bin/dockerd", "/usr/sbin/dockerd", "docker.io"),
    ("usr/bin/docker-init", "/usr/bin/docker-init", "docker.io"),  # links to tini-static (tini: docker.io needs it)
    ("usr/bin/docker-proxy", "/usr/sbin/docker-proxy", "docker.io"),
    ("usr/bin/containerd", "/usr/bin/containerd", "containerd"),
    ("usr/bin/containerd-shim-runc-v2", "/usr/bin/containerd-shim-runc-v2", "containerd"),
    ("usr/bin/ctr", "/usr/bin/ctr", "containerd"),
    ("usr/bin/runc", "/usr/sbin/runc", "runc"),
)
XTABLES_MULTI = "/usr/sbin/xtables-legacy-multi"  # COS uses legacy iptables
XTABLES_MODULES = "/usr/lib/{multiarch}/xtables"
IPTABLES_LINKS = ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore")
DOCKER_GROUP = "docker:x:412:chronos"

CONTAINERD_SERVICE = """\
[Unit]
Description=containerd container runtime
Documentation=https://containerd.io
After=network.target local-fs.target

[Service]
ExecStart=/usr/bin/containerd
Type=notify
Delegate=yes
KillMode=process
Restart=always
RestartSec=5
LimitNPROC=infinity
LimitCORE=infinity
LimitNOFILE=infinity
TasksMax=infinity
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
"""

DOCKER_SOCKET = """\
[Unit]
Description=Docker Socket for the API
PartOf=docker.service

[Socket]
ListenStream=/var/run/docker.sock
SocketMode=0660
SocketUser=root
SocketGroup=docker

[Install]
WantedBy=sockets.target
"""

# COS's own command line (as executors.local.daemon_units cites it).
DOCKERD_EXEC = (
    "/usr/bin/dockerd --registry-mirror=https://mirror.gcr.io --host=fd:// "
    "--containerd=/var/run/containerd/containerd.sock $DOCKER_OPTS"
)
DOCKER_SERVICE = f"""\
[Unit]
Description=Docker Application Container Engine
Documentation=https://docs.docker.com
After=network-online.target docker.socket containerd.service
Wants=network-online.target
Requires=docker.socket containerd.service

[Service]
Type=notify
EnvironmentFile=-/etc/default/docker
ExecStart={DOCKERD_EXEC}
ExecReload=/bin/kill -s HUP $MAINPID
TimeoutStartSec=0
Restart=always
RestartSec=2
StartLimitBurst=3
StartLimitInterval=60s
LimitNOFILE=1048576
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
Delegate=yes
KillMode=process
OOMScoreAdjust=-500

[Install]
WantedBy=multi-user.target
"""

UNITS = {"containerd.service": CONTAINERD_SERVICE, "docker.socket": DOCKER_SOCKET, "docker.service": DOCKER_SERVICE}


def _xtables_modules(arch: Arch) -> str:
    return XTABLES_MODULES.format(multiarch=MULTIARCH[arch])


def check_host() -> None:
    """Refuse, in one line naming the Debian package, a machine without the runtime to copy."""
    wanted = [(host, package) for _, host, package in BINARIES]
    wanted += [(XTABLES_MULTI, "iptables"), (_xtables_modules(Arch.host()), "iptables")]
    for host, package in wanted:
        if not Path(host).exists():
            raise ValidationError(
                f"-with-containers copies this machine's container runtime and {host} is missing: "
                f"apt-get install {package} (scripts/setup does)"
            )


def install(root: Path, source: Path = Path("/"), arch: Arch | None = None) -> list[Path]:
    """Copy the runtime and write its units and group into the root tree `root` (made by `root_tree`).

    `source`: where the runtime is taken from: this machine (/), or Debian's packages for `arch`
    unpacked there (`sample_userland`). Returns the executables and modules (under `source`) whose
    shared libraries `root` also needs.
    """
    arch = arch or Arch.host()
    if source == Path("/"):
        check_host()

    def found(path: str) -> Path:
        return Path(path).resolve() if source == Path("/") else sample_userland.inside(source, path)

    needs_libraries: list[Path] = []
    for inside, host, _ in BINARIES:
        target = root / inside
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(found(host), target)
        needs_libraries.append(found(host))
    (root / "usr/sbin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(found(XTABLES_MULTI), root / XTABLES_MULTI.lstrip("/"))
    for name in IPTABLES_LINKS:
        (root / "usr/sbin" / name).symlink_to("xtables-legacy-multi")
    xtables = _xtables_modules(arch)
    modules = root / xtables.lstrip("/")
    shutil.copytree(found(xtables), modules, symlinks=True)
    needs_libraries.append(found(XTABLES_MULTI))
    needs_libraries += sorted(p for p in found(xtables).glob("*.so") if not p.is_symlink())
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for name, text in UNITS.items():
        (units / name).write_text(text)
    group = root / "etc/group"
    group.write_text(group.read_text() + DOCKER_GROUP + "\n")
    return needs_libraries
