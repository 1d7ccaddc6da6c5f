"""The provisioner command: usage, the metadata watcher, refusals. No root needed."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cos_customizer.provisioner.main import main


class Metadata(http.server.BaseHTTPRequestHandler):
    """A stand-in metadata server: the key appears after a few requests."""

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        ok = self.path.endswith("/DaisyEnd") and type(self).hits > 2 and self.headers["Metadata-Flavor"] == "Google"
        body = b"ack" if ok else b"not found"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def metadata(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    Metadata.hits = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("GCE_METADATA_HOST", host)
    yield host
    server.shutdown()


def test_wait_metadata_returns_when_the_key_appears(metadata: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cos_customizer.provisioner import main as module

    assert module.wait_metadata("DaisyEnd", timeout=30, interval=0.05) == 0
    assert capsys.readouterr().out == "metadata key DaisyEnd is set: ack\n"
    assert Metadata.hits == 3


def test_wait_metadata_times_out(metadata: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cos_customizer.provisioner import main as module

    assert module.wait_metadata("Other", timeout=0.2, interval=0.05) == 1
    assert "metadata key Other did not appear within 0 seconds" in capsys.readouterr().err


def test_usage_errors_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "cos_customizer.provisioner", "run"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "the following arguments are required: --config" in result.stderr


def test_resume_without_state_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"root": str(tmp_path), "disk": str(tmp_path / "disk"), "partition_template": ""}))
    assert main([f"--target={target}", "resume"]) == 1
    out = capsys.readouterr().out
    assert f"BuildFailed: {tmp_path}/var/lib/.cos-customizer/state.json does not exist: nothing to resume" in out


def test_unknown_step_in_the_config_names_the_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"Steps": [{"Type": "SealOEM"}, {"Type": "Reboot"}]}))
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"root": str(tmp_path), "disk": str(tmp_path / "disk")}))
    assert main([f"--target={target}", "run", f"--config={config}"]) == 1
    assert (
        f'BuildFailed: cannot use {config}: {config}: Steps[1]: unknown step type "Reboot"' in capsys.readouterr().out
    )
    assert not (tmp_path / "var").exists()  # refused before anything was written
