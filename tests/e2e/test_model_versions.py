"""Several models and versions in one daemon process; load/unload at runtime."""

from __future__ import annotations

import signal
import time

from tests.helpers import start_daemon
from tests.unit.tiny_model import write_tiny_bundle

BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def test_versions_load_unload_and_reload(tmp_path):
    models = tmp_path / "models"
    write_tiny_bundle(models / "a-1", name="alpha", version="1.0.0")
    write_tiny_bundle(models / "b-1", name="beta", version="1.0.0")
    daemon = start_daemon(tmp_path / "d", models, extra_toml='versions = "all"')
    try:
        status, body = daemon.get("/v2/models/alpha")
        assert status == 200 and body["versions"] == ["1.0.0"]
        # a new version appears on disk and is loaded through the repository API
        write_tiny_bundle(models / "a-2", name="alpha", version="1.1.0")
        status, _ = daemon.post("/v2/repository/models/alpha/load", {})
        assert status == 200
        status, body = daemon.post("/v2/models/alpha/infer", BODY)
        assert status == 200 and body["model_version"] == "1.1.0"
        status, body = daemon.post("/v2/models/alpha/versions/1.0.0/infer", BODY)
        assert status == 200 and body["model_version"] == "1.0.0"
        # unloading one model leaves the other serving
        status, _ = daemon.post("/v2/repository/models/alpha/unload", {})
        assert status == 200
        status, body = daemon.post("/v2/models/alpha/infer", BODY)
        assert status == 503 and "not ready" in body["error"]
        status, body = daemon.post("/v2/models/beta/infer", BODY)
        assert status == 200
        status, rows = daemon.post("/v2/repository/index", {"ready": True})
        assert [(r["name"], r["version"]) for r in rows] == [("beta", "1.0.0")]
        # SIGHUP reloads everything from disk
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, _ = daemon.get("/v2/models/alpha/ready")
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200
        status, _ = daemon.post("/v2/repository/models/gamma/load", {})
        assert status == 404
    finally:
        assert daemon.stop() == 0, daemon.logs()
