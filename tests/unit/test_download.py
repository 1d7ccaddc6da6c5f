"""Authenticated downloads on the preload VM, against loopback stand-ins of the metadata server and GCS.

The GCS stand-in behaves as a private bucket (the default Cloud Build bucket):
anonymous requests are refused with 401, a wrong token with 403; objects are
served at the JSON API media path only with `Authorization: Bearer <token>`,
the token the metadata stand-in hands out with `Metadata-Flavor: Google`.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cos_customizer.provisioner import agent, download
from cos_customizer.provisioner.config import ProvisionerConfig
from cos_customizer.provisioner.state import State
from cos_customizer.provisioner.target import Target

TOKEN = "ya29.stand-in-token"


@dataclass
class Cloud:
    """What the stand-ins serve and what they saw."""

    objects: dict[tuple[str, str], bytes] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    gcs_requests: list[tuple[str, str]] = field(default_factory=list)  # (raw path, Authorization)
    metadata_host: str = ""
    gcs_host: str = ""


def _answer(handler: http.server.BaseHTTPRequestHandler, code: int, body: bytes, kind: str = "text/plain") -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


@contextlib.contextmanager
def standins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cloud]:
    """The metadata and GCS stand-ins, with the provisioner's endpoints pointed at them."""
    state = Cloud()

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/computeMetadata/v1/instance/service-accounts/default/token":
                state.token_requests.append(dict(self.headers))
                if self.headers.get("Metadata-Flavor") != "Google":
                    _answer(self, 403, b"Missing Metadata-Flavor:Google header")
                    return
                body = json.dumps({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"})
                _answer(self, 200, body.encode(), "application/json")
                return
            _answer(self, 404, b"not found")

        def log_message(self, *_args: object) -> None:
            pass

    class Storage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization", "")
            state.gcs_requests.append((self.path, auth))
            if not auth:
                _answer(self, 401, b'{"error": {"code": 401, "message": "Anonymous caller"}}', "application/json")
                return
            if auth != f"Bearer {TOKEN}":
                _answer(self, 403, b'{"error": {"code": 403, "message": "Forbidden"}}', "application/json")
                return
            parsed = urllib.parse.urlsplit(self.path)
            parts = parsed.path.split("/")
            # /storage/v1/b/BUCKET/o/OBJECT, the object name URL-encoded into one path segment
            if parts[:4] != ["", "storage", "v1", "b"] or len(parts) != 7 or parts[5] != "o":
                _answer(self, 404, b"no such API path")
                return
            if urllib.parse.parse_qs(parsed.query).get("alt") != ["media"]:
                _answer(self, 400, b"only alt=media here")
                return
            key = (urllib.parse.unquote(parts[4]), urllib.parse.unquote(parts[6]))
            if key not in state.objects:
                _answer(self, 404, b'{"error": {"code": 404, "message": "No such object"}}', "application/json")
                return
            _answer(self, 200, state.objects[key], "application/octet-stream")

        def log_message(self, *_args: object) -> None:
            pass

    metadata_server, state.metadata_host = _serve(Metadata)
    gcs_server, state.gcs_host = _serve(Storage)
    monkeypatch.setenv("GCE_METADATA_HOST", state.metadata_host)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{state.gcs_host}")
    monkeypatch.setattr(download, "_token", None)
    try:
        yield state
    finally:
        metadata_server.shutdown()
        gcs_server.shutdown()


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cloud]:
    with standins(monkeypatch) as state:
        yield state


def test_fetch_reads_a_private_object_with_the_vm_token(cloud: Cloud, tmp_path: Path) -> None:
    cloud.objects["my-builds", "build 7/gcs files/NVIDIA x.run"] = b"driver bytes"
    destination = tmp_path / "out"
    download.fetch("gs://my-builds/build 7/gcs files/NVIDIA x.run", destination)
    assert destination.read_bytes() == b"driver bytes"
    assert cloud.gcs_requests == [
        ("/storage/v1/b/my-builds/o/build%207%2Fgcs%20files%2FNVIDIA%20x.run?alt=media", f"Bearer {TOKEN}")
    ]
    assert [r["Metadata-Flavor"] for r in cloud.token_requests] == ["Google"]
    assert list(tmp_path.iterdir()) == [destination]


def test_the_token_is_reused_while_it_is_valid(cloud: Cloud, tmp_path: Path) -> None:
    cloud.objects["b", "one"] = b"1"
    cloud.objects["b", "two"] = b"2"
    download.fetch("gs://b/one", tmp_path / "one")
    download.fetch("gs://b/two", tmp_path / "two")
    assert ((tmp_path / "one").read_bytes(), (tmp_path / "two").read_bytes()) == (b"1", b"2")
    assert len(cloud.token_requests) == 1


def test_a_missing_object_is_one_clear_error(cloud: Cloud, tmp_path: Path) -> None:
    with pytest.raises(download.DownloadError) as err:
        download.fetch("gs://my-builds/build-7/user_build_context.tar", tmp_path / "ctx.tar")
    assert str(err.value) == "cannot download gs://my-builds/build-7/user_build_context.tar: HTTP 404 Not Found"
    assert list(tmp_path.iterdir()) == []


def test_anonymous_reads_are_refused(cloud: Cloud, tmp_path: Path) -> None:
    """What the provisioner did before: the object's public address over plain HTTPS, no credentials."""
    cloud.objects["my-builds", "build-7/user_build_context.tar"] = b"tar"
    old_address = f"http://{cloud.gcs_host}/my-builds/build-7/user_build_context.tar"
    with pytest.raises(download.DownloadError, match=r"^cannot download http://.*: HTTP 401 Unauthorized$"):
        download.fetch(old_address, tmp_path / "ctx.tar")
    api = f"http://{cloud.gcs_host}/storage/v1/b/my-builds/o/build-7%2Fuser_build_context.tar?alt=media"
    with pytest.raises(download.DownloadError, match="HTTP 401 Unauthorized"):
        download.fetch(api, tmp_path / "ctx.tar")
    assert [auth for _, auth in cloud.gcs_requests] == ["", ""]
    download.fetch("gs://my-builds/build-7/user_build_context.tar", tmp_path / "ctx.tar")
    assert (tmp_path / "ctx.tar").read_bytes() == b"tar"


def test_no_token_is_one_clear_error(cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCE_METADATA_HOST", cloud.gcs_host)  # answers 401 to the token request
    with pytest.raises(download.DownloadError) as err:
        download.fetch("gs://b/o", tmp_path / "o")
    assert str(err.value) == (
        f"cannot get an access token from http://{cloud.gcs_host}/computeMetadata/v1/instance/"
        "service-accounts/default/token: HTTP 401 Unauthorized"
    )


def test_other_sources_and_malformed_addresses(tmp_path: Path) -> None:
    source = tmp_path / "src file"
    source.write_bytes(b"local")
    download.fetch(source.as_uri(), tmp_path / "a")
    download.fetch(str(source), tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == b"local"
    with pytest.raises(
        download.DownloadError, match=r"^cannot download gs://bucket-only: expected gs://BUCKET/OBJECT$"
    ):
        download.fetch("gs://bucket-only", tmp_path / "c")
    with pytest.raises(download.DownloadError, match=r"^cannot download ftp://h/x: use gs://"):
        download.fetch("ftp://h/x", tmp_path / "c")


def test_the_default_endpoints() -> None:
    assert download.object_url("b", "a/b c") == "https://storage.googleapis.com/storage/v1/b/b/o/a%2Fb%20c?alt=media"


def test_unpack_contexts_fetches_gs_build_contexts_with_the_token(cloud: Cloud, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("preload.sh")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"echo\n"))
    cloud.objects["my-builds", "build-7/user_build_context.tar"] = buffer.getvalue()
    config = ProvisionerConfig(build_contexts=(("user", "gs://my-builds/build-7/user_build_context.tar"),))
    state = State.create(tmp_path / "var/lib/.cos-customizer", config)
    said: list[str] = []
    agent.unpack_contexts(Target(root=tmp_path), state, said.append)
    assert (state.directory / "user/preload.sh").read_text() == "echo\n"
    assert not (state.directory / "user.tar").exists()
    assert cloud.gcs_requests[-1][1] == f"Bearer {TOKEN}"
    assert said == ["Unpacking build context user from gs://my-builds/build-7/user_build_context.tar"]


def test_wait_metadata_uses_the_same_metadata_helper(cloud: Cloud) -> None:
    from cos_customizer.provisioner import main

    assert main.metadata_value("DaisyEnd") is None
    assert download.metadata_url("instance/attributes/DaisyEnd") == (
        f"http://{cloud.metadata_host}/computeMetadata/v1/instance/attributes/DaisyEnd"
    )
