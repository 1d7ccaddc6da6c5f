"""The GCS JSON API server the guest of a rehearsed GCE build reads gs:// through, against real clients.

The oracles are the provisioner's own `download.fetch` (with the token from a real `MetadataServer`)
and the official google-cloud-storage client (with google-auth's Compute Engine credentials, which
take their token from that metadata server), not this server's code.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import google.api_core.exceptions
import google.auth.compute_engine._metadata
import pytest
from google.auth import compute_engine
from google.cloud import storage  # type: ignore[attr-defined]

from cos_customizer.executors.qemu import resources as qemu_resources
from cos_customizer.executors.qemu.gcs_server import BUCKET, GcsServer
from cos_customizer.executors.qemu.metadata_server import MetadataServer
from cos_customizer.provisioner import download
from tests.unix_http import UnixHTTPConnection, tcp_bridge

TOKEN = "ya29.gcs-server-test-token"
NAME = "dir/sub dir/the object.bin"
SECRET = b"host secret 9f3c1e: must never reach the guest"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "gcs"
    (root / "bucket" / "dir" / "sub dir").mkdir(parents=True)
    return root


@pytest.fixture
def payload(tree: Path) -> bytes:
    data = os.urandom(5 * (1 << 20) + 12345)
    (tree / "bucket" / NAME).write_bytes(data)
    return data


@pytest.fixture
def gcs(tree: Path) -> Iterator[GcsServer]:
    with GcsServer(tree, TOKEN) as server:
        yield server


@pytest.fixture
def metadata() -> Iterator[MetadataServer]:
    with MetadataServer(token=TOKEN) as server:
        yield server


@pytest.fixture
def gcs_host(gcs: GcsServer) -> Iterator[str]:
    """host:port relayed to the GCS server's socket, for clients that take only that (the guest has socat)."""
    with tcp_bridge(gcs.socket) as host:
        yield host


@pytest.fixture
def guest_env(gcs_host: str, metadata: MetadataServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The provisioner's endpoints (and google-auth's) pointed at the two servers; no cached token."""
    with tcp_bridge(metadata.socket) as metadata_host:
        monkeypatch.setenv(download.STORAGE_HOST_ENV, f"http://{gcs_host}")
        monkeypatch.setenv(download.METADATA_HOST_ENV, metadata_host)
        monkeypatch.setattr(download, "_token", None)
        # google-auth reads GCE_METADATA_HOST once, when it is imported.
        monkeypatch.setattr(google.auth.compute_engine._metadata, "_GCE_METADATA_HOST", metadata_host)
        yield


def client(gcs_host: str) -> storage.Client:
    credentials = compute_engine.Credentials(universe_domain="googleapis.com")  # type: ignore[no-untyped-call]
    return storage.Client(project="p", credentials=credentials, client_options={"api_endpoint": f"http://{gcs_host}"})


def get(
    gcs: GcsServer, path: str, token: str | None = TOKEN, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = UnixHTTPConnection(gcs.socket, timeout=30)
    try:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        connection.request(method, path, headers=sent)
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


def media(name: str, bucket: str = "bucket") -> str:
    """The path and query the provisioner asks for the object."""
    url = urllib.parse.urlsplit(download.object_url(bucket, name))
    return f"{url.path}?{url.query}"


# -- (1) the provisioner's own download


@pytest.mark.usefixtures("guest_env")
def test_the_provisioner_downloads_an_object_with_the_metadata_token(
    gcs: GcsServer, payload: bytes, tmp_path: Path
) -> None:
    destination = tmp_path / "out.bin"
    download.fetch(f"gs://bucket/{NAME}", destination)
    assert destination.read_bytes() == payload
    [seen] = gcs.requests
    assert (seen.method, seen.authorized, seen.status) == ("GET", True, 200)
    assert seen.path == "/storage/v1/b/bucket/o/dir%2Fsub%20dir%2Fthe%20object.bin"
    assert seen.query == {"alt": "media"}


# -- (2) google-cloud-storage


@pytest.mark.usefixtures("guest_env")
def test_google_cloud_storage_downloads_and_reads_metadata(gcs: GcsServer, gcs_host: str, payload: bytes) -> None:
    bucket = client(gcs_host).bucket("bucket")
    assert bucket.blob(NAME).download_as_bytes() == payload
    assert bucket.blob(NAME).download_as_bytes(start=1000, end=1999) == payload[1000:2000]
    blob = bucket.get_blob(NAME)
    assert blob is not None
    assert (blob.name, blob.bucket.name, blob.size) == (NAME, "bucket", len(payload))
    assert blob.download_as_bytes() == payload  # with the generation it read: the same one
    assert bucket.get_blob("dir/missing") is None
    with pytest.raises(google.api_core.exceptions.NotFound):
        client(gcs_host).bucket("nobucket").blob(NAME).download_as_bytes()
    objects = [r for r in gcs.requests if "/o/" in r.path]
    assert {r.path.split("/o/")[0] for r in objects} == {
        "/download/storage/v1/b/bucket",  # media
        "/storage/v1/b/bucket",  # get_blob
        "/download/storage/v1/b/nobucket",
    }
    # Anything else is the client's background bucket-metadata lookups (for its telemetry): not served.
    assert all(r.path.startswith("/storage/v1/b/") and r.status == 501 for r in gcs.requests if r not in objects)
    assert all(request.authorized for request in gcs.requests)


def test_object_metadata_as_gcs_gives_it(gcs: GcsServer, payload: bytes) -> None:
    status, headers, body = get(gcs, media(NAME).removesuffix("?alt=media"))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    resource = json.loads(body)
    assert resource["kind"] == "storage#object"
    assert (resource["name"], resource["bucket"], resource["size"]) == (NAME, "bucket", str(len(payload)))
    status, _, _ = get(gcs, f"{media(NAME)}&generation={resource['generation']}")
    assert status == 200
    status, _, body = get(gcs, f"{media(NAME)}&generation=1")
    assert status == 404 and json.loads(body)["error"]["code"] == 404


def test_ranges(gcs: GcsServer, payload: bytes) -> None:
    size = len(payload)
    for header, first, last in (
        ("bytes=10-19", 10, 19),
        ("bytes=-5", size - 5, size - 1),
        (f"bytes={size - 3}-", size - 3, size - 1),
    ):
        status, headers, body = get(gcs, media(NAME), headers={"Range": header})
        assert (status, body) == (206, payload[first : last + 1])
        assert headers["Content-Range"] == f"bytes {first}-{last}/{size}"
    assert get(gcs, media(NAME), headers={"Range": f"bytes={size}-"})[0] == 416


def test_listing_and_buckets_are_not_served(gcs: GcsServer, payload: bytes) -> None:
    """Nothing in the guest lists a bucket (install-gpu's deps come over public https, not this API)."""
    for path in ("/storage/v1/b/bucket/o?prefix=dir/", "/storage/v1/b/bucket", "/storage/v1/b"):
        status, _, body = get(gcs, path)
        assert status == 501 and json.loads(body)["error"]["code"] == 501
    assert get(gcs, "/elsewhere")[0] == 404


# -- (3) authentication


def test_requests_without_the_token_are_refused(gcs: GcsServer, payload: bytes) -> None:
    for token in (None, "ya29.wrong", ""):
        status, headers, body = get(gcs, media(NAME), token=token)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        error = json.loads(body)["error"]
        assert error["code"] == 401 and error["errors"][0]["location"] == "Authorization"
    assert [(r.authorized, r.status) for r in gcs.requests] == [(False, 401)] * 3
    status, _, _ = get(gcs, media("dir/missing"), token=None)
    assert status == 401  # the refusal does not tell which objects exist


def test_the_provisioner_fails_with_401_on_a_wrong_token(
    gcs: GcsServer, gcs_host: str, payload: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with MetadataServer(token="ya29.some-other-account") as metadata, tcp_bridge(metadata.socket) as metadata_host:
        monkeypatch.setenv(download.STORAGE_HOST_ENV, f"http://{gcs_host}")
        monkeypatch.setenv(download.METADATA_HOST_ENV, metadata_host)
        monkeypatch.setattr(download, "_token", None)
        with pytest.raises(download.DownloadError, match="HTTP 401"):
            download.fetch(f"gs://bucket/{NAME}", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    [seen] = gcs.requests
    assert (seen.authorized, seen.status) == (False, 401)


def test_read_only(gcs: GcsServer, payload: bytes) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "FROB"):
        status, _, body = get(gcs, media(NAME), method=method)
        assert status == 405, method
        assert payload[:64] not in body
    assert (gcs.root / "bucket" / NAME).read_bytes() == payload


# -- (4) nothing outside the root


def test_no_escape_from_the_root(gcs: GcsServer, tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (tmp_path / "secret").write_bytes(SECRET)
    bucket = tree / "bucket"
    (bucket / "link").symlink_to(outside / "secret")
    (bucket / "dirlink").symlink_to(outside)
    (bucket / "dir" / "rel").symlink_to("../../../outside/secret")
    (tree / "linkbucket").symlink_to(outside)
    os.mkfifo(bucket / "fifo")
    paths = [
        media("link"),
        media("dirlink/secret"),
        media("dir/rel"),
        media("secret", bucket="linkbucket"),
        media("../../outside/secret"),
        media("dir/../../../secret"),
        media("./link"),
        media("dir//x"),
        media("dir/"),
        media("dir\0x"),
        media("fifo"),
        media("dir"),
        "/storage/v1/b/bucket/o/../../../outside/secret?alt=media",
        "/storage/v1/b/bucket/o/%2E%2E%2F%2E%2E%2Foutside%2Fsecret?alt=media",
        "/storage/v1/b/..%2Foutside/o/secret?alt=media",
        "/storage/v1/b/../o/outside%2Fsecret?alt=media",
        "/storage/v1/b/bucket/o/%ff%fe?alt=media",
        media("link").removesuffix("?alt=media"),
    ]
    for path in paths:
        status, _, body = get(gcs, path)
        assert 400 <= status < 500, path
        assert SECRET not in body, path
        assert "error" in json.loads(body), path
    assert len(gcs.requests) == len(paths) and all(r.authorized and r.status >= 400 for r in gcs.requests)


def test_symlinks_refused_through_google_cloud_storage(
    gcs: GcsServer, gcs_host: str, tree: Path, tmp_path: Path, guest_env: None
) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    (tree / "bucket" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(google.api_core.exceptions.NotFound):
        client(gcs_host).bucket("bucket").blob("link").download_as_bytes()


# -- (5) missing objects and buckets


def test_missing_object_and_bucket(gcs: GcsServer, payload: bytes) -> None:
    status, _, body = get(gcs, media("dir/nothing"))
    assert status == 404
    assert json.loads(body)["error"]["message"] == "No such object: bucket/dir/nothing"
    status, _, body = get(gcs, media("x", bucket="nobucket"))
    assert status == 404 and json.loads(body)["error"]["errors"][0]["reason"] == "notFound"
    status, _, _ = get(gcs, media("x", bucket="UPPER"))
    assert status == 400


def test_bucket_names_as_the_resources_take_them() -> None:
    assert BUCKET.pattern == qemu_resources.BUCKET.pattern


# -- life cycle


def test_close_cuts_a_stalled_download(tree: Path) -> None:
    with (tree / "bucket" / "big").open("wb") as big:
        big.truncate(256 << 20)
    server = GcsServer(tree, TOKEN)
    server.start()
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(os.fspath(server.socket))
    try:
        stalled.sendall(f"GET {media('big')} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        assert stalled.recv(12) == b"HTTP/1.0 200"  # then never reads on
        time.sleep(0.2)
        closer = threading.Thread(target=server.close)
        started = time.monotonic()
        closer.start()
        closer.join(20)
        assert not closer.is_alive() and time.monotonic() - started < 10
    finally:
        stalled.close()
    assert [(r.authorized, r.status) for r in server.requests] == [(True, 200)]
    with pytest.raises(RuntimeError):
        _ = server.socket
