"""Downloads on the preload VM: gs:// objects with the VM's service account, and the metadata server.

`fetch(url, destination)` takes `gs://BUCKET/OBJECT` (read through the GCS
JSON API with the default service account's access token, as a GCS client
library on the VM would: the build's bucket is usually private), `http://`,
`https://`, `file://`, or a plain path. Tests point the endpoints at
loopback stand-ins: `GCE_METADATA_HOST` (host[:port] of the metadata server,
the convention Google's auth libraries use) and `STORAGE_EMULATOR_HOST` (the
GCS endpoint, the convention google-cloud-storage uses). Standard library
only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cos_customizer.errors import CustomizerError

METADATA_HOST_ENV = "GCE_METADATA_HOST"
METADATA_HOST = "metadata.google.internal"
STORAGE_HOST_ENV = "STORAGE_EMULATOR_HOST"
STORAGE_ENDPOINT = "https://storage.googleapis.com"
TOKEN_PATH = "instance/service-accounts/default/token"
TIMEOUT = 120
CHUNK = 1 << 20


class DownloadError(CustomizerError):
    """A download failed; the message names the address and the HTTP status or the error."""


def metadata_url(path: str) -> str:
    host = os.environ.get(METADATA_HOST_ENV) or METADATA_HOST
    return f"http://{host}/computeMetadata/v1/{path}"


def metadata_get(path: str, timeout: float = 10) -> bytes | None:
    """GET a metadata server path (e.g. `instance/attributes/KEY`); None when it does not exist (404)."""
    request = urllib.request.Request(metadata_url(path), headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


_token: tuple[str, float] | None = None


def access_token() -> str:
    """The default service account's OAuth access token, from the metadata server (cached until near expiry)."""
    global _token
    if _token is not None and time.monotonic() < _token[1]:
        return _token[0]
    url = metadata_url(TOKEN_PATH)
    try:
        body = metadata_get(TOKEN_PATH, timeout=30)
        if body is None:
            raise DownloadError(f"cannot get an access token from {url}: HTTP 404 (no service account?)")
        data = json.loads(body)
        token = data["access_token"]
        if not isinstance(token, str) or not token:
            raise ValueError("empty access_token")
        lifetime = float(data.get("expires_in", 300))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"cannot get an access token from {url}: HTTP {err.code} {err.reason}") from err
    except OSError as err:
        raise DownloadError(f"cannot get an access token from {url}: {err}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise DownloadError(f"cannot get an access token from {url}: unexpected answer ({err})") from err
    _token = (token, time.monotonic() + max(0.0, lifetime - 60))
    return token


def storage_endpoint() -> str:
    host = os.environ.get(STORAGE_HOST_ENV, "").rstrip("/")
    if not host:
        return STORAGE_ENDPOINT
    return host if "://" in host else f"http://{host}"


def split_gs(url: str) -> tuple[str, str]:
    """gs://BUCKET/OBJECT -> (BUCKET, OBJECT); both must be there."""
    bucket, _, name = url[len("gs://") :].partition("/")
    if not url.startswith("gs://") or not bucket or not name:
        raise DownloadError(f"cannot download {url}: expected gs://BUCKET/OBJECT")
    return bucket, name


def object_url(bucket: str, name: str) -> str:
    """The JSON API media address of an object (its name URL-encoded, slashes included)."""
    quoted = urllib.parse.quote(name, safe="")
    return f"{storage_endpoint()}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/{quoted}?alt=media"


def fetch(url: str, destination: Path) -> None:
    """Download `url` to `destination` (written under a temporary name, then renamed)."""
    partial = destination.with_name(f".{destination.name}.partial")
    try:
        if url.startswith("gs://"):
            bucket, name = split_gs(url)
            headers = {"Authorization": f"Bearer {access_token()}"}
            request = urllib.request.Request(object_url(bucket, name), headers=headers)
        elif urllib.parse.urlparse(url).scheme in ("http", "https", "file"):
            request = urllib.request.Request(url)
        elif "://" in url:
            raise DownloadError(f"cannot download {url}: use gs://, http://, https://, file:// or a path")
        else:
            shutil.copyfile(url, partial)
            partial.rename(destination)
            return
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response, open(partial, "wb") as out:
            while chunk := response.read(CHUNK):
                out.write(chunk)
        partial.rename(destination)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    except OSError as err:
        raise DownloadError(f"cannot download {url}: {err}") from err
    finally:
        partial.unlink(missing_ok=True)
