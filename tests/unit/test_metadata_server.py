"""The local GCE metadata server: the API the guest of a rehearsed GCE build uses, and the provisioner against it."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cos_customizer import privilege
from cos_customizer.executors.qemu.gcs_server import GcsServer
from cos_customizer.executors.qemu.metadata_server import MetadataServer
from cos_customizer.provisioner import download
from tests.local_attacker import attack, own_socket_inodes, unreachable
from tests.unit.test_download import TOKEN, standins
from tests.unix_http import UnixHTTPConnection, tcp_bridge

GOOGLE = {"Metadata-Flavor": "Google"}


class Reply:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()
        self.etag = response.headers.get("ETag")

    def json(self) -> object:
        return json.loads(self.body)


def get(server: MetadataServer, path: str, headers: dict[str, str] | None = None, timeout: float = 60) -> Reply:
    connection = UnixHTTPConnection(server.socket, timeout=timeout)
    try:
        connection.request("GET", f"/computeMetadata/v1/{path}", headers=GOOGLE if headers is None else headers)
        return Reply(connection.getresponse())
    finally:
        connection.close()


def until(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class Background:
    """A GET in another thread, so the test can change the metadata while the request is held."""

    def __init__(self, server: MetadataServer, path: str) -> None:
        self.reply: Reply | None = None
        self.thread = threading.Thread(target=self._run, args=(server, path))
        self.thread.start()

    def _run(self, server: MetadataServer, path: str) -> None:
        self.reply = get(server, path)

    def result(self) -> Reply:
        self.thread.join(60)
        assert not self.thread.is_alive()
        assert self.reply is not None
        return self.reply


@pytest.fixture
def server() -> Iterator[MetadataServer]:
    with MetadataServer({"user-data": "#cloud-config\n", "cos-build": "yes"}, project_attributes={"p": "1"}) as md:
        yield md


def test_the_flavor_header_is_required_as_on_gce(server: MetadataServer) -> None:
    for headers in ({}, {"Metadata-Flavor": "google-ish"}, {**GOOGLE, "X-Forwarded-For": "10.0.0.1"}):
        reply = get(server, "instance/attributes/user-data", headers)
        assert reply.status == 403
        assert reply.headers["Metadata-Flavor"] == "Google"
        assert b"user-data" not in reply.body and b"cloud-config" not in reply.body
    reply = get(server, "instance/attributes/user-data")
    assert (reply.status, reply.body, reply.headers["Metadata-Flavor"]) == (200, b"#cloud-config\n", "Google")
    seen = [(r.flavor, r.status) for r in server.requests]
    assert seen == [(None, 403), ("google-ish", 403), ("Google", 403), ("Google", 200)]
    assert server.requests[-1].path == "/computeMetadata/v1/instance/attributes/user-data"


def test_values_directories_and_recursive_json(server: MetadataServer) -> None:
    assert get(server, "instance/attributes/cos-build").body == b"yes"
    assert get(server, "instance/attributes/absent").status == 404
    assert get(server, "instance/nothing/here").status == 404
    assert get(server, "instance/id").body == b"4242424242424242424"
    assert get(server, "instance/zone").body == b"projects/123456789012/zones/local-zone-a"
    assert get(server, "instance/name").body == b"inst-build"
    assert get(server, "instance/hostname").body == b"inst-build.local-zone-a.c.cos-customizer-local.internal"
    email = get(server, "instance/service-accounts/default/email").body
    assert email == b"123456789012-compute@developer.gserviceaccount.com"
    assert get(server, "project/project-id").body == b"cos-customizer-local"
    # what cloud-init's GCE datasource asks (recursive=True) and what other clients ask (recursive=true)
    for flag in ("True", "true"):
        reply = get(server, f"instance/attributes/?recursive={flag}")
        assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
        assert reply.json() == {"user-data": "#cloud-config\n", "cos-build": "yes"}
        assert get(server, f"project/attributes/?recursive={flag}").json() == {"p": "1"}
    assert get(server, "instance/attributes/").body == b"user-data\ncos-build\n"
    assert get(server, "instance/").body.splitlines()[-2:] == [b"service-accounts/", b"attributes/"]
    moved = get(server, "instance/attributes")
    assert (moved.status, moved.headers["Location"]) == (301, "/computeMetadata/v1/instance/attributes/")
    whole = get(server, "instance/?recursive=true").json()
    assert isinstance(whole, dict)
    assert whole["attributes"] == {"user-data": "#cloud-config\n", "cos-build": "yes"}  # attribute names kept
    assert whole["serviceAccounts"]["default"]["email"] == email.decode()  # built-in names camelCased
    assert "token" not in json.dumps(whole)
    assert get(server, "instance/id?alt=json").json() == 4242424242424242424


def test_token_for_the_provisioner(server: MetadataServer, monkeypatch: pytest.MonkeyPatch) -> None:
    reply = get(server, "instance/service-accounts/default/token")
    assert reply.json() == {"access_token": "ya29.local-metadata-token", "expires_in": 3599, "token_type": "Bearer"}
    server.token = "ya29.another"
    with tcp_bridge(server.socket) as host:
        monkeypatch.setenv("GCE_METADATA_HOST", host)
        monkeypatch.setattr(download, "_token", None)
        assert download.access_token() == "ya29.another"
        assert download.metadata_get("instance/attributes/cos-build") == b"yes"
        assert download.metadata_get("instance/attributes/absent") is None


def test_the_service_account_by_its_email_as_google_auth_asks(
    server: MetadataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """google-auth's Compute Engine credentials, once they know the account's email, read
    `service-accounts/EMAIL/?recursive=true` and `service-accounts/EMAIL/token` (GCE answers both)."""
    from google.auth import compute_engine
    from google.auth.transport import requests as google_requests

    email = "123456789012-compute@developer.gserviceaccount.com"
    info = get(server, f"instance/service-accounts/{email}/?recursive=true").json()
    assert info == {"email": email, "aliases": "default", "scopes": "https://www.googleapis.com/auth/cloud-platform"}
    assert (
        get(server, f"instance/service-accounts/{email}/token").json()
        == get(server, "instance/service-accounts/default/token").json()
    )
    credentials = compute_engine.Credentials(service_account_email=email)  # type: ignore[no-untyped-call]
    with tcp_bridge(server.socket) as host:
        monkeypatch.setattr(compute_engine._metadata, "_GCE_METADATA_HOST", host)  # read once at its import
        credentials.refresh(google_requests.Request())  # type: ignore[no-untyped-call]
    assert credentials.token == "ya29.local-metadata-token"


def test_wait_for_change_answers_an_update_with_a_new_etag(server: MetadataServer) -> None:
    first = get(server, "instance/attributes/cos-build")
    held = Background(server, "instance/attributes/cos-build?wait_for_change=true")
    until(lambda: server.waiting == 1)
    server.set_attributes({"unrelated": "x"})  # another key: this value's ETag is unchanged, still held
    time.sleep(0.2)
    assert held.thread.is_alive()
    server.set_attributes({"cos-build": "done"})
    reply = held.result()
    assert (reply.status, reply.body) == (200, b"done")
    assert reply.etag and first.etag and reply.etag != first.etag
    assert get(server, "instance/attributes/cos-build").etag == reply.etag
    assert server.waiting == 0


def test_wait_for_change_on_a_directory_and_on_an_absent_key(server: MetadataServer) -> None:
    """The DaisyEnd case: a guest waiting for a key Daisy has not set yet."""
    recursive = Background(server, "instance/attributes/?recursive=true&wait_for_change=true&timeout_sec=60")
    absent = Background(server, "instance/attributes/DaisyEnd?wait_for_change=true&timeout_sec=60")
    until(lambda: server.waiting == 2)
    started = time.monotonic()
    server.set_attributes({"DaisyEnd": "success"})
    assert absent.result().body == b"success"
    reply = recursive.result()
    assert isinstance(data := reply.json(), dict) and data["DaisyEnd"] == "success"
    assert time.monotonic() - started < 20


def test_wait_for_change_times_out_with_the_same_etag(server: MetadataServer) -> None:
    first = get(server, "instance/attributes/cos-build")
    started = time.monotonic()
    reply = get(server, "instance/attributes/cos-build?wait_for_change=true&timeout_sec=1")
    assert 0.9 <= time.monotonic() - started < 20
    assert (reply.status, reply.body, reply.etag) == (200, b"yes", first.etag)


def test_last_etag(server: MetadataServer) -> None:
    current = get(server, "instance/attributes/cos-build").etag
    started = time.monotonic()
    # a stale ETag ("0" is what Google's hanging-get sample starts with) answers at once with the current one
    stale = get(server, "instance/attributes/cos-build?wait_for_change=true&last_etag=0&timeout_sec=60")
    assert time.monotonic() - started < 20
    assert (stale.body, stale.etag) == (b"yes", current)
    # the current ETag holds the request: here until the timeout ...
    same = get(server, f"instance/attributes/cos-build?wait_for_change=true&last_etag={current}&timeout_sec=1")
    assert same.etag == current
    # ... and a change made before the request arrives is still seen: the request compares with last_etag
    server.set_attributes({"cos-build": "changed"})
    late = get(server, f"instance/attributes/cos-build?wait_for_change=True&last_etag={current}&timeout_sec=60")
    assert late.body == b"changed" and late.etag != current
    assert get(server, "instance/id?wait_for_change=true&timeout_sec=soon").status == 400


def test_close_releases_held_requests() -> None:
    others = set(threading.enumerate())  # threads of other tests (client libraries) may live on
    server = MetadataServer({"k": "v"})
    server.start()
    try:
        held = Background(server, "instance/attributes/k?wait_for_change=true")
        until(lambda: server.waiting == 1)
    finally:
        server.close()
    assert held.result().status == 503
    assert not [t for t in threading.enumerate() if t not in others and not t.daemon]


def test_provisioner_wait_metadata_returns_when_daisy_sets_the_key(server: MetadataServer) -> None:
    command = [sys.executable, "-m", "cos_customizer.provisioner", "wait-metadata", "DaisyEnd", "--timeout=20"]
    with (
        tcp_bridge(server.socket) as host,
        subprocess.Popen(
            command,
            env={**os.environ, "GCE_METADATA_HOST": host},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc,
    ):
        try:
            until(lambda: any(r.path.endswith("/DaisyEnd") for r in server.requests))
            assert proc.poll() is None
            server.set_attributes({"DaisyEnd": "success"})
            out, err = proc.communicate(timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "metadata key DaisyEnd is set: success" in out
    asked = [r for r in server.requests if r.path.endswith("/DaisyEnd")]
    assert {(r.flavor, r.status) for r in asked} == {("Google", 404), ("Google", 200)}


def test_provisioner_downloads_gs_objects_with_the_servers_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with standins(monkeypatch) as cloud, MetadataServer(token=TOKEN) as metadata, tcp_bridge(metadata.socket) as host:
        monkeypatch.setenv("GCE_METADATA_HOST", host)
        cloud.objects[("bucket", "dir/context.tar.gz")] = b"the build context"
        download.fetch("gs://bucket/dir/context.tar.gz", tmp_path / "context.tar.gz")
        assert (tmp_path / "context.tar.gz").read_bytes() == b"the build context"
        assert [(r.path, r.flavor) for r in metadata.requests] == [
            ("/computeMetadata/v1/instance/service-accounts/default/token", "Google")
        ]
        assert cloud.token_requests == []  # the stand-in's own metadata server was not asked
        assert [auth for _, auth in cloud.gcs_requests] == [f"Bearer {TOKEN}"]

        # another token is refused by the GCS stand-in
        metadata.token = "ya29.not-the-bucket-owner"
        monkeypatch.setattr(download, "_token", None)
        with pytest.raises(download.DownloadError, match="HTTP 403"):
            download.fetch("gs://bucket/dir/context.tar.gz", tmp_path / "again")
        assert not (tmp_path / "again").exists()


# -- other local users (issue 20, point 4): the guest's services are the tool's uid's only

CONTEXT = "/storage/v1/b/cos-customizer-local/o/cos-customizer%2Fuser_build_context.tar?alt=media"
needs_root = pytest.mark.skipif(not privilege.can_mount(), reason="needs root (the probe runs as nobody)")


@needs_root
def test_other_local_users_get_neither_the_token_nor_the_user_data_nor_an_object(tmp_path: Path) -> None:
    """Both servers as a rehearsal starts them; `nobody` finds this process's listening sockets in /proc/net and
    asks each for the token, the user-data and, with any token it got, the build context's object."""
    secret = "build context secret 7d1f0c"
    (tmp_path / "gcs" / "cos-customizer-local" / "cos-customizer").mkdir(parents=True)
    (tmp_path / "gcs" / "cos-customizer-local" / "cos-customizer" / "user_build_context.tar").write_text(secret)
    user_data = "#cloud-config\nruncmd: [echo private]\n"
    before = set(own_socket_inodes())  # other tests' servers in this process (a session's emulators) are not asked
    with MetadataServer({"user-data": user_data}, token=TOKEN) as md, GcsServer(tmp_path / "gcs", TOKEN) as gcs:
        loot = attack(CONTEXT, [inode for inode in own_socket_inodes() if inode not in before])
        assert loot.leaked(TOKEN, user_data, secret) == []
        assert loot.targets and [target for target in loot.targets if target.startswith("tcp ")] == []
        # Each server's socket was seen in /proc/net/unix, and the kernel refused every connection (EACCES).
        assert unreachable(loot, md.socket) and unreachable(loot, gcs.socket), loot.answers
        # This uid is served: the guest's side (QEMU's socat) runs as this uid.
        assert get(md, "instance/service-accounts/default/token").json()["access_token"] == TOKEN  # type: ignore[index]


@needs_root
def test_a_connection_from_another_uid_is_not_served_even_where_it_can_connect() -> None:
    """Defence in depth: with the private directory opened up by mistake, the peer's uid is still refused."""
    before = set(own_socket_inodes())
    with MetadataServer({"user-data": "#cloud-config\n"}, token=TOKEN) as md:
        md.socket.parent.chmod(0o755)
        md.socket.chmod(0o666)
        loot = attack(CONTEXT, [inode for inode in own_socket_inodes() if inode not in before])
        mine = [a for a in loot.answers if a["target"] == f"unix {md.socket}"]
        assert mine and all(not a.get("status") and not a["body"] for a in mine), mine
        assert loot.leaked(TOKEN, "#cloud-config") == []
        assert get(md, "instance/attributes/user-data").body == b"#cloud-config\n"
    assert [r.path for r in md.requests] == ["/computeMetadata/v1/instance/attributes/user-data"]
