"""Test helpers for container images: a real registry, image layers and archives, and a scratch dockerd.

Plain functions and context managers (no pytest fixtures here):

- `Registry`: Debian's docker-registry (distribution 2.8) on 127.0.0.1 at a free port, storing in a
  temporary directory; it checks every digest it is given.
- `busybox_layer`, `random_layer`: deterministic uncompressed layer tars.
- `push_image`: a urllib client of the Registry HTTP API v2 that pushes a schema 2 image.
- `docker_archive`: a `docker save` tarball (`docker load`, `ctr images import`).
- `ScratchDockerd`, `ScratchContainerd`: the host's dockerd (with its own containerd), or containerd
  alone, in private mount, network and PID namespaces, with their state in a temporary directory, so
  that nothing of the host changes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

Completed = subprocess.CompletedProcess[str]

REGISTRY_BINARY = "/usr/bin/docker-registry"
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's docker.io client, never /usr/local/bin/docker
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
BUSYBOX = "/bin/busybox"  # busybox-static
APPLETS = ("sh", "ls", "cat", "echo", "id", "sleep", "mkdir", "touch", "rm", "test", "true", "false", "wc", "head",
           "find", "stat", "df")  # fmt: skip
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EPOCH = "1970-01-01T00:00:00Z"

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
CHUNK = 1 << 20
STORE_ABOVE = 16 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], pid: int | None = None, timeout: float = 20) -> None:
    """SIGTERM `pid` (default: the process's own), wait, then SIGKILL; always reaps `process`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid or process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid or process.pid, signal.SIGKILL)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        process.wait(timeout)


class Registry:
    """Debian's `docker-registry serve` on 127.0.0.1:`port`, storing under `tmp` (a context manager).

    `.url` is "http://127.0.0.1:PORT"; `.host` is "127.0.0.1:PORT", for image names such as
    f"{registry.host}/bb:1" (dockerd talks plain HTTP to 127.0.0.0/8 registries without being told).
    The registry's log is `tmp/registry.log`.
    """

    def __init__(self, tmp: Path, *, timeout: float = 30) -> None:
        self.tmp = tmp
        self.timeout = timeout
        self.port = 0
        self.log = tmp / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def __enter__(self) -> Registry:
        if not Path(REGISTRY_BINARY).exists():
            raise RuntimeError(f"{REGISTRY_BINARY} is missing: apt-get install docker-registry")
        self.tmp.mkdir(parents=True, exist_ok=True)
        (self.tmp / "storage").mkdir(exist_ok=True)
        for _attempt in range(3):  # another process may take the free port before the registry binds it
            self.port = free_port()
            config = self.tmp / "config.yml"
            config.write_text(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {self.tmp / 'storage'}\n  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.host}\n"
            )
            with open(self.log, "ab") as log:
                self._process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdin=subprocess.DEVNULL,
                                                 stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            if self._wait_ready():
                return self
            self._stop()
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text(errors='replace')[-2000:]}")

    def _wait_ready(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self._process.poll() is None:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as response:
                if response.status == 200:
                    return True
            time.sleep(0.05)
        return False

    def _stop(self) -> None:
        if self._process is not None:
            _stop(self._process)
            self._process = None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop()

    def request(
        self, method: str, path: str, data: bytes | IO[bytes] | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One API call (`path` absolute, or a full URL); returns status, headers and body (errors too)."""
        url = urllib.parse.urljoin(self.url, path)
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()


def _tarinfo(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, size: int = 0, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, link
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    tar.addfile(_tarinfo(name, mode=mode, size=len(data)), io.BytesIO(data))


def busybox_layer(path: Path) -> None:
    """An uncompressed layer tar of the host's static busybox with applet links in /bin, /etc/passwd and /tmp."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tarinfo("bin", tarfile.DIRTYPE, 0o755))
        with open(BUSYBOX, "rb") as f:
            tar.addfile(_tarinfo("bin/busybox", mode=0o755, size=os.fstat(f.fileno()).st_size), f)
        for applet in APPLETS:
            tar.addfile(_tarinfo(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox"))
        tar.addfile(_tarinfo("etc", tarfile.DIRTYPE, 0o755))
        _add_bytes(tar, "etc/group", b"root:x:0:\n")
        _add_bytes(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        tar.addfile(_tarinfo("root", tarfile.DIRTYPE, 0o700))
        tar.addfile(_tarinfo("tmp", tarfile.DIRTYPE, 0o1777))


class _RandomStream(io.RawIOBase):
    """`size` pseudo-random bytes, the same for the same seed."""

    def __init__(self, size: int, seed: int) -> None:
        self._left = size
        self._random = random.Random(seed)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        count = self._left if size < 0 else min(size, self._left)
        self._left -= count
        return self._random.randbytes(count)


def random_layer(path: Path, size_bytes: int, seed: int) -> None:
    """An uncompressed layer tar with one file, /data/blob: `size_bytes` incompressible bytes fixed by `seed`."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tarinfo("data", tarfile.DIRTYPE, 0o755))
        tar.addfile(_tarinfo("data/blob", size=size_bytes), _RandomStream(size_bytes, seed))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def image_config(layers: list[Path], config: dict[str, Any] | None = None, architecture: str = "amd64") -> bytes:
    """The image config JSON: `architecture`/linux, diff_ids of the uncompressed `layers`, and a container config
    of Cmd ["sh"] and a PATH Env, updated with `config` (keys such as Cmd, Entrypoint, Env, WorkingDir)."""
    document = {
        "architecture": architecture,
        "os": "linux",
        "created": EPOCH,
        "config": {"Env": [PATH_ENV], "Cmd": ["sh"], **(config or {})},
        "rootfs": {"type": "layers", "diff_ids": [_sha256_file(layer) for layer in layers]},
        "history": [{"created": EPOCH, "created_by": "tests/registry.py"} for _ in layers],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _gzip(layer: Path, out: Path) -> tuple[str, int]:
    """`layer` gzipped into `out` (mtime 0, no name: the same bytes each time); its digest and size.

    Layers over `STORE_ABOVE` bytes are stored uncompressed inside the gzip stream (level 0): the big
    ones here are incompressible, and deflating 200 MB of them takes zlib about 8 s for nothing.
    """
    level = 0 if layer.stat().st_size > STORE_ABOVE else 6
    with (
        open(layer, "rb") as src,
        open(out, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level) as compressed,
    ):
        shutil.copyfileobj(src, compressed, CHUNK)
    return _sha256_file(out), out.stat().st_size


def _upload_blob(registry: Registry, name: str, path: Path | None, data: bytes, digest: str) -> None:
    """Upload one blob (from `path`, or `data`) unless the registry has it: POST, then a monolithic PUT."""
    status, _, _ = registry.request("HEAD", f"/v2/{name}/blobs/{digest}")
    if status == 200:
        return
    status, headers, body = registry.request("POST", f"/v2/{name}/blobs/uploads/", b"")
    if status != 202:
        raise RuntimeError(f"starting an upload of {name} failed: {status} {body!r}")
    location = headers["Location"]
    location += ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})
    size = path.stat().st_size if path is not None else len(data)
    put_headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    with open(path, "rb") if path is not None else io.BytesIO(data) as stream:
        status, _, body = registry.request("PUT", location, stream, put_headers)
    if status != 201:
        raise RuntimeError(f"uploading {digest} to {name} failed: {status} {body!r}")


def push_image(
    registry: Registry,
    name: str,
    tag: str,
    layers: list[Path],
    config: dict[str, Any] | None = None,
    architecture: str = "amd64",
) -> str:
    """Push an image of the uncompressed layer tars `layers` (gzipped on the way) as `name:tag`, with the
    Registry HTTP API v2 and a schema 2 manifest; returns the manifest digest ("sha256:...")."""
    with tempfile.TemporaryDirectory(prefix="push.") as tmp:
        descriptors = []
        for index, layer in enumerate(layers):
            compressed = Path(tmp) / f"{index}.tar.gz"
            digest, size = _gzip(layer, compressed)
            _upload_blob(registry, name, compressed, b"", digest)
            descriptors.append({"mediaType": LAYER_GZIP, "size": size, "digest": digest})
        config_bytes = image_config(layers, config, architecture)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        _upload_blob(registry, name, None, config_bytes, config_digest)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": {"mediaType": CONFIG_V1, "size": len(config_bytes), "digest": config_digest},
            "layers": descriptors,
        },
        indent=3,
    ).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    status, headers, body = registry.request(
        "PUT", f"/v2/{name}/manifests/{tag}", manifest, {"Content-Type": MANIFEST_V2}
    )
    if status != 201:
        raise RuntimeError(f"putting the manifest of {name}:{tag} failed: {status} {body!r}")
    if headers.get("Docker-Content-Digest") != digest:
        raise RuntimeError(f"the registry names the manifest {headers.get('Docker-Content-Digest')}, not {digest}")
    return digest


def push_index(registry: Registry, name: str, tag: str, images: dict[str, list[Path]]) -> None:
    """Push one image per architecture (`images`: "amd64" or "arm64" -> its layer tars) and, as `name:tag`,
    a manifest list naming each by its platform (what a multi-architecture image is)."""
    entries = []
    for architecture, layers in images.items():
        digest = push_image(registry, name, f"{tag}-{architecture}", layers, architecture=architecture)
        status, _, body = registry.request("GET", f"/v2/{name}/manifests/{digest}", None, {"Accept": MANIFEST_V2})
        entries.append({"mediaType": MANIFEST_V2, "size": len(body), "digest": digest,
                        "platform": {"architecture": architecture, "os": "linux"}})  # fmt: skip
    document = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_LIST, "manifests": entries}).encode()
    status, _, body = registry.request("PUT", f"/v2/{name}/manifests/{tag}", document, {"Content-Type": MANIFEST_LIST})
    if status != 201:
        raise RuntimeError(f"putting the manifest list of {name}:{tag} failed: {status} {body!r}")


def docker_archive(path: Path, repo_tag: str, layers: list[Path], config: dict[str, Any] | None = None) -> str:
    """Write a `docker save` tarball of the uncompressed layer tars `layers`, tagged `repo_tag` ("bb:1").

    manifest.json (Config, RepoTags, Layers), the config as <hex>.json, each layer as <hex>/layer.tar
    and a `repositories` file; `docker load` and `ctr images import` read it. Returns the image id,
    "sha256:" and the config's sha256 (what `docker images --no-trunc` shows).
    """
    config_bytes = image_config(layers, config)
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    layer_dirs = [_sha256_file(layer).removeprefix("sha256:") for layer in layers]
    repo, _, tag = repo_tag.rpartition(":")
    if not repo or "/" in tag:
        repo, tag = repo_tag, "latest"
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": [f"{repo}:{tag}"],
                 "Layers": [f"{hex_}/layer.tar" for hex_ in layer_dirs]}]  # fmt: skip
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        written: set[str] = set()
        for hex_, layer in zip(layer_dirs, layers, strict=True):
            if hex_ in written:
                continue
            written.add(hex_)
            tar.addfile(_tarinfo(hex_, tarfile.DIRTYPE, 0o755))
            _add_bytes(tar, f"{hex_}/VERSION", b"1.0")
            with open(layer, "rb") as f:
                tar.addfile(_tarinfo(f"{hex_}/layer.tar", size=os.fstat(f.fileno()).st_size), f)
        _add_bytes(tar, f"{config_hex}.json", config_bytes)
        _add_bytes(tar, "manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
        _add_bytes(tar, "repositories", json.dumps({repo: {tag: layer_dirs[-1]}}).encode() if layer_dirs else b"{}")
    return f"sha256:{config_hex}"


class _Scratch:
    """A daemon of this machine in private mount and PID namespaces (and network, unless
    `host_network`), started with `unshare` and its state under `tmp`: a context manager. Its
    sockets and run-time state are in `.run`, a short directory /tmp/scratch.* (a Unix socket's
    path has at most 107 bytes, and pytest's tmp_path is long), removed at exit.

    In its mount namespace `/run` and `/etc/docker` are fresh tmpfs (containerd's shim sockets and
    runc's state, dockerd's key.json) and its overlay mounts vanish with the namespace; the daemon is
    PID 1 of its PID namespace, so SIGKILL ends all it started. On exit: SIGTERM, wait, SIGKILL.
    """

    name = ""
    log_name = ""

    def __init__(self, tmp: Path, *, host_network: bool = False, timeout: float = 60) -> None:
        self.tmp = tmp
        self.host_network = host_network
        self.timeout = timeout
        self.log = tmp / self.log_name
        self.run = Path("/tmp") / f"scratch.{uuid.uuid4().hex[:12]}"
        self._process: subprocess.Popen[bytes] | None = None
        self._cgroups_before: set[str] = set()
        self._ctr_namespaces: set[str] = set()

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _cleanup(self) -> None:
        """Remove the empty cgroups named after the containerd namespaces `ctr` used (`ctr run` puts its
        containers in /NAMESPACE/ID) that were not there before."""
        for namespace in self._ctr_namespaces - self._cgroups_before:
            for cgroup in Path("/sys/fs/cgroup").glob(f"*/{namespace}"):
                with contextlib.suppress(OSError):
                    cgroup.rmdir()

    def __enter__(self) -> Self:
        if not Path("/usr/bin/unshare").exists():
            raise RuntimeError("/usr/bin/unshare is missing: apt-get install util-linux")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(mode=0o700)
        self._cgroups_before = {path.name for path in Path("/sys/fs/cgroup").glob("*/*") if path.is_dir()}
        argv = self._argv()
        if not Path(argv[0]).exists():
            raise RuntimeError(f"{argv[0]} is missing: apt-get install {self.name}")
        prepare = (
            "set -e; mount -t tmpfs -o mode=0755 tmpfs /run; "
            'if [ -d /etc/docker ]; then mount -t tmpfs -o mode=0755 tmpfs /etc/docker; fi; exec "$@"'
        )
        namespaces = ["--mount", "--pid", "--mount-proc", "--fork", "--kill-child=SIGKILL"]
        if not self.host_network:
            namespaces.append("--net")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.tmp)}
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(["/usr/bin/unshare", *namespaces, "--", "/bin/sh", "-c", prepare, "sh",
                                              *argv], stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self._stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self._process.returncode}): {self._log_tail()}")
            if self._ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer in {self.timeout:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def daemon_pid(self) -> int | None:
        """The daemon's PID on this machine: unshare's child (the shell that became the daemon)."""
        if self._process is None:
            return None
        pid = self._process.pid
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            return int(children[0]) if children else None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    return int(stat.parent.name)
        return None

    def _stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            _stop(self._process, self.daemon_pid(), timeout=30)
        self._process = None
        self._cleanup()
        shutil.rmtree(self.run, ignore_errors=True)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop()

    def _client(self, argv: list[str], check: bool, timeout: float, env: dict[str, str] | None = None) -> Completed:
        environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.tmp), **(env or {})}
        result = subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr}")
        return result

    def _ctr(self, address: Path, args: tuple[str | Path, ...], check: bool, timeout: float) -> Completed:
        """ctr in the daemon's mount, PID (and network) namespaces, where its FIFOs, /run and /proc are the daemon's."""
        pid = self.daemon_pid()
        if pid is None:
            raise RuntimeError(f"{self.name} is not running")
        words = [str(arg) for arg in args]
        flags = [i for i, word in enumerate(words[:-1]) if word in ("-n", "--namespace")]
        self._ctr_namespaces.add(words[flags[0] + 1] if flags else "default")
        enter = ["/usr/bin/nsenter", f"--target={pid}", "--mount", "--pid", *([] if self.host_network else ["--net"])]
        return self._client([*enter, CTR, "--address", str(address), *words], check, timeout)


def _ctr_ready(address: Path) -> bool:
    if not address.exists():
        return False
    return subprocess.run([CTR, "--address", str(address), "version"], capture_output=True, check=False).returncode == 0


class ScratchDockerd(_Scratch):
    """The host's dockerd with its own containerd (see `_Scratch`), its data in `data_root` (default
    `tmp/data-root`; e.g. a mounted STATE's var_overlay/lib/docker), its log and config under `tmp`,
    its exec-root (with its containerd's socket, `.containerd_socket`) and socket in `.run`.

    `--iptables=false --ip6tables=false --bridge=none --ip-forward=false` leave the network alone,
    and its containers' cgroups are under a parent of its own, removed at exit. With
    `host_network=True` it shares this machine's network, to pull from a `Registry` on 127.0.0.1 (or
    for `docker build --network=host` to reach package registries). `.docker(*args)` runs Debian's docker
    client against it; `.ctr(*args)` runs ctr against its containerd (which holds dockerd's
    containers in namespace "moby"; dockerd 20.10 keeps its images in `data_root` itself).
    """

    name = "docker.io"
    log_name = "dockerd.log"

    def __init__(
        self, tmp: Path, *, data_root: Path | None = None, host_network: bool = False, timeout: float = 60
    ) -> None:
        super().__init__(tmp, host_network=host_network, timeout=timeout)
        self.data_root = data_root or tmp / "data-root"
        self.exec_root = self.run / "exec-root"
        self.socket = self.run / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.containerd_socket = self.exec_root / "containerd/containerd.sock"
        self.cgroup_parent = f"cos-customizer-scratch-{uuid.uuid4().hex[:12]}"

    def _argv(self) -> list[str]:
        for directory in (self.data_root, self.exec_root, self.tmp / "client"):
            directory.mkdir(parents=True, exist_ok=True)
        if not Path(DOCKER).exists():
            raise RuntimeError(f"{DOCKER} is missing: apt-get install docker.io")
        (self.tmp / "daemon.json").write_text("{}\n")
        return [
            DOCKERD, f"--config-file={self.tmp / 'daemon.json'}", f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}", f"--pidfile={self.tmp / 'dockerd.pid'}", "-H", self.host,
            "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--bridge=none",
            f"--cgroup-parent=/{self.cgroup_parent}",
        ]  # fmt: skip

    def _ready(self) -> bool:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.socket))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            status = reply.split(b"\r\n", 1)[0]
            return status.startswith(b"HTTP/1.") and b" 200 " in status
        return False

    def _cleanup(self) -> None:
        super()._cleanup()
        for cgroup in Path("/sys/fs/cgroup").glob(f"*/{self.cgroup_parent}"):
            with contextlib.suppress(OSError):
                cgroup.rmdir()

    def docker(self, *args: str | Path, check: bool = True, timeout: float = 300) -> Completed:
        """Run Debian's docker client against this dockerd (its config under `tmp/client`), text out."""
        argv = [DOCKER, "-H", self.host, *map(str, args)]
        return self._client(argv, check, timeout, {"DOCKER_CONFIG": str(self.tmp / "client")})

    def ctr(self, *args: str | Path, check: bool = True, timeout: float = 300) -> Completed:
        """Run ctr against this dockerd's containerd, in its namespaces, text out."""
        return self._ctr(self.containerd_socket, args, check, timeout)


class ScratchContainerd(_Scratch):
    """The host's containerd alone (see `_Scratch`), its data in `root` (default `tmp/root`; e.g. a
    mounted STATE's var_overlay/lib/containerd), its log under `tmp`, its state and socket in `.run`,
    on its default configuration. `.ctr(*args)` runs ctr against it (pass `-n k8s.io` for COS's namespace).
    """

    name = "containerd"
    log_name = "containerd.log"

    def __init__(self, tmp: Path, *, root: Path | None = None, host_network: bool = False, timeout: float = 60) -> None:
        super().__init__(tmp, host_network=host_network, timeout=timeout)
        self.root = root or tmp / "root"
        self.state = self.run / "state"
        self.socket = self.run / "containerd.sock"

    def _argv(self) -> list[str]:
        for directory in (self.root, self.state):
            directory.mkdir(parents=True, exist_ok=True)
        (self.tmp / "config.toml").write_text("version = 2\n")
        return [CONTAINERD, "--config", str(self.tmp / "config.toml"), "--root", str(self.root),
                "--state", str(self.state), "--address", str(self.socket)]  # fmt: skip

    def _ready(self) -> bool:
        return _ctr_ready(self.socket)

    def ctr(self, *args: str | Path, check: bool = True, timeout: float = 300) -> Completed:
        """Run ctr against this containerd, in its namespaces, text out (`-n k8s.io` first for COS's)."""
        return self._ctr(self.socket, args, check, timeout)
