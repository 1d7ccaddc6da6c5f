"""A loopback stand-in for the few Compute Engine REST calls cos-customizer makes.

Images (get, getFromFamily, list, deprecate) and instances (list with a label
filter, delete), kept in memory; every request is recorded.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

PREFIX = "/compute/v1/projects/"


@dataclass
class Compute:
    images: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # project -> name -> image
    instances: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # project/zone -> name -> instance
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    url: str = ""

    def add_image(self, project: str, name: str, *, family: str = "", created: str = "2024-01-01T00:00:00.000-07:00",
                  labels: dict[str, str] | None = None, deprecated: bool = False,
                  architecture: str = "X86_64") -> None:  # fmt: skip
        image: dict[str, Any] = {"name": name, "family": family, "creationTimestamp": created, "labels": labels or {},
                                 "selfLink": f"{self.url}{PREFIX}{project}/global/images/{name}", "status": "READY",
                                 "architecture": architecture}  # fmt: skip
        if deprecated:
            image["deprecated"] = {"state": "DEPRECATED"}
        self.images.setdefault(project, {})[name] = image

    def add_instance(self, project: str, zone: str, name: str, labels: dict[str, str], created: str) -> None:
        self.instances.setdefault(f"{project}/{zone}", {})[name] = {"name": name, "labels": labels,
                                                                    "creationTimestamp": created}  # fmt: skip


def _operation(name: str) -> dict[str, Any]:
    return {"kind": "compute#operation", "name": f"operation-{name}", "status": "DONE", "progress": 100}


class Handler(http.server.BaseHTTPRequestHandler):
    compute: Compute

    def log_message(self, *_args: object) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _missing(self, what: str) -> None:
        self._send(404, {"error": {"code": 404, "message": f"The resource '{what}' was not found",
                                   "errors": [{"reason": "notFound", "message": "not found"}]}})  # fmt: skip

    def _route(self, method: str) -> None:
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null") if length else None
        self.compute.requests.append((method, url.path, body))
        if not url.path.startswith(PREFIX):
            return self._missing(url.path)
        rest = url.path[len(PREFIX) :]
        images = self.compute.images
        if m := re.fullmatch(r"([^/]+)/global/images/family/([^/]+)", rest):
            project, family = m.groups()
            found = [i for i in images.get(project, {}).values() if i["family"] == family and "deprecated" not in i]
            if not found:
                return self._missing(f"projects/{project}/global/images/family/{family}")
            return self._send(200, max(found, key=lambda i: i["creationTimestamp"]))
        if m := re.fullmatch(r"([^/]+)/global/images/([^/]+)/deprecate", rest):
            project, name = m.groups()
            if name not in images.get(project, {}):
                return self._missing(f"projects/{project}/global/images/{name}")
            images[project][name]["deprecated"] = body
            return self._send(200, _operation(name))
        if m := re.fullmatch(r"([^/]+)/global/images/([^/]+)", rest):
            project, name = m.groups()
            if name not in images.get(project, {}):
                return self._missing(f"projects/{project}/global/images/{name}")
            return self._send(200, images[project][name])
        if m := re.fullmatch(r"([^/]+)/global/images", rest):
            items = list(images.get(m.group(1), {}).values())
            flt = query.get("filter", [""])[0]
            if fam := re.search(r'family\s*=\s*"?([\w-]+)', flt):
                items = [i for i in items if i["family"] == fam.group(1)]
            return self._send(200, {"items": items})
        if m := re.fullmatch(r"([^/]+)/zones/([^/]+)/instances", rest):
            items = list(self.compute.instances.get(f"{m.group(1)}/{m.group(2)}", {}).values())
            flt = query.get("filter", [""])[0]
            if lab := re.search(r"labels\.([\w-]+)", flt):
                items = [i for i in items if lab.group(1) in i["labels"]]
            return self._send(200, {"items": items})
        if m := re.fullmatch(r"([^/]+)/zones/([^/]+)/instances/([^/]+)", rest):
            key, name = f"{m.group(1)}/{m.group(2)}", m.group(3)
            if method == "DELETE" and name in self.compute.instances.get(key, {}):
                del self.compute.instances[key][name]
                return self._send(200, _operation(name))
            return self._missing(rest)
        return self._missing(rest)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")


def serve() -> tuple[Compute, http.server.ThreadingHTTPServer]:
    compute = Compute()
    handler = type("BoundHandler", (Handler,), {"compute": compute})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    compute.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return compute, server
