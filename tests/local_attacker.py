"""Another local user (`nobody`) against the rehearsal's guest services: what a uid other than the tool's can take.

`attack(inodes, gcs_path)` runs a standard-library probe as uid/gid 65534 with no supplementary groups.
Like any local user it lists the listening sockets in /proc/net/tcp, /proc/net/tcp6 and /proc/net/unix
(world-readable), then, on each of them, asks for the service-account token and the user-data as the
guest would (`Metadata-Flavor: Google`), and for the GCS object `gcs_path` with every token it got.
It only knocks on the sockets whose inodes the test names (those of its own process), so services
of other people on the machine are left alone; which ones those are it reads from /proc/net like
anyone. The oracle is the kernel's answer and the bytes that came back, not the servers' code.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
PYTHON = "/usr/bin/python3"  # the system's: the project's venv need not be readable by nobody

_PROBE = r"""
import json, os, socket, sys

wanted = set(json.loads(sys.argv[1]))
gcs_path = sys.argv[2]


def tcp():
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/net/{name}") as table:
            for line in list(table)[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                address, port = fields[1].split(":")
                host = "127.0.0.1" if family == socket.AF_INET else "::1"  # a wildcard is reached on loopback too
                if family == socket.AF_INET and address not in ("00000000",):
                    raw = bytes.fromhex(address)[::-1]
                    host = socket.inet_ntop(socket.AF_INET, raw)
                yield fields[9], f"tcp {host}:{int(port, 16)}", (family, (host, int(port, 16)))


def unix():
    with open("/proc/net/unix") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if int(fields[3], 16) & 0x10000 and len(fields) > 7:  # __SO_ACCEPTCON: listening, with a name
                path = fields[7]
                target = "\0" + path[1:] if path.startswith("@") else path
                yield fields[6], f"unix {path}", (socket.AF_UNIX, target)


def ask(family, address, request):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(address)
        sock.sendall(request)
        data = b""
        while len(data) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as err:
        return {"error": err.errno and os.strerror(err.errno) or str(err), "body": ""}
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else ""
    return {"status": status, "body": body.decode(errors="replace")}


listeners = list(tcp()) + list(unix())
targets = [(label, where) for inode, label, where in listeners if inode in wanted]
answers, tokens = [], set()
for label, (family, address) in targets:
    for path in ("instance/service-accounts/default/token", "instance/attributes/user-data"):
        request = f"GET /computeMetadata/v1/{path} HTTP/1.0\r\nHost: metadata\r\nMetadata-Flavor: Google\r\n\r\n"
        answer = ask(family, address, request.encode())
        answers.append({"target": label, "asked": path, **answer})
        try:
            tokens.add(json.loads(answer["body"])["access_token"])
        except (ValueError, KeyError, TypeError):
            pass
for label, (family, address) in targets:
    for token in sorted(tokens) or [""]:
        request = f"GET {gcs_path} HTTP/1.0\r\nHost: storage\r\nAuthorization: Bearer {token}\r\n\r\n"
        answers.append({"target": label, "asked": "gcs", **ask(family, address, request.encode())})
print(json.dumps({"listeners": len(listeners), "targets": [label for label, _ in targets], "answers": answers}))
"""


@dataclass(frozen=True)
class Loot:
    listeners: int  # listening sockets nobody saw on the machine
    targets: list[str]  # those it knocked on ("tcp 127.0.0.1:PORT", "unix /path")
    answers: list[dict[str, str]]  # per request: target, asked, and status+body or error

    def leaked(self, *secrets: str) -> list[str]:
        """The answers holding any of `secrets`, one line each."""
        return [f"{a['target']} {a['asked']}: {a.get('status')}" for a in self.answers
                if any(secret and secret in a.get("body", "") for secret in secrets)]  # fmt: skip


def own_socket_inodes() -> list[str]:
    """The inodes of every socket this process holds (its servers' listening sockets among them)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.append(target[len("socket:[") : -1])
    return found


def attack(gcs_path: str, inodes: list[str] | None = None) -> Loot:
    """Run the probe as nobody against this process's sockets (or `inodes`)."""
    result = subprocess.run(
        [PYTHON, "-I", "-c", _PROBE, json.dumps(inodes if inodes is not None else own_socket_inodes()), gcs_path],
        user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    return Loot(found["listeners"], found["targets"], found["answers"])


def unreachable(loot: Loot, socket: Path) -> bool:
    """Whether nobody found `socket` in /proc/net/unix and the kernel refused it every connection."""
    answers = [a for a in loot.answers if a["target"] == f"unix {socket}"]
    return bool(answers) and all(a.get("error") == os.strerror(13) for a in answers)  # EACCES
