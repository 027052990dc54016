"""systemd integration without a VM: sd_notify over a real datagram socket
bound as $NOTIFY_SOCKET, the unit checked by systemd-analyze, and
`edged install --dry-run`."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from edged.cli_install import unit_text
from tests.helpers import REPO, free_port, http, start_daemon
from tests.unit.tiny_model import write_tiny_bundle


class NotifyListener:
    """Collects (time, message) datagrams sent to a real AF_UNIX socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self.on_ready: list[bool] = []  # was the model ready when READY=1 arrived?
        self.url = ""
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096).decode()
            except OSError:
                continue
            if data.startswith("READY=1") and self.url:
                status, _, _ = http("GET", self.url + "/v2/models/tiny/ready")
                self.on_ready.append(status == 200)
            self.messages.append((time.monotonic(), data))

    def lines(self, prefix: str) -> list[str]:
        return [m for _, m in self.messages if m.startswith(prefix)]

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def test_notify_ready_status_watchdog_stopping(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    port = free_port()
    listener.url = f"http://127.0.0.1:{port}"
    try:
        daemon = start_daemon(
            tmp_path / "d", tmp_path / "models", port=port,
            env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "400000"},
        )
        deadline = time.monotonic() + 10
        while not listener.lines("READY=1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.lines("READY=1"), listener.messages
        assert listener.on_ready == [True], "READY=1 came before the model was ready"
        assert any("loading models" in m for m in listener.lines("STATUS="))
        assert any("ready: 1 model version" in m for m in listener.lines("STATUS="))
        start = time.monotonic()
        time.sleep(1.5)
        pings = [t for t, m in listener.messages if m == "WATCHDOG=1" and t >= start]
        assert 3 <= len(pings) <= 12, f"{len(pings)} pings in 1.5 s at a 0.2 s interval"
        assert daemon.stop(signal.SIGTERM) == 0
        time.sleep(0.3)
        assert listener.lines("STOPPING=1")
    finally:
        listener.close()


def test_bad_config_never_sends_ready(tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    config = tmp_path / "edged.toml"
    config.write_text("threads = -1\n")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "edged.cli", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=60, env={"NOTIFY_SOCKET": listener.path, "PATH": "/usr/bin:/bin"},
        )
        time.sleep(0.3)
        assert out.returncode == 2
        assert "threads" in out.stderr and str(config) in out.stderr
        assert not listener.lines("READY=1")
    finally:
        listener.close()


def _rendered_unit(tmp_path):
    unit = tmp_path / "edged.service"
    unit.write_text(unit_text(str(REPO / ".venv" / "bin" / "edged") if (REPO / ".venv").exists() else sys.executable))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies(tmp_path):
    out = subprocess.run(["systemd-analyze", "verify", str(_rendered_unit(tmp_path))], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_security_exposure_at_most_2_5(tmp_path):
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(_rendered_unit(tmp_path))],
        capture_output=True, text=True,
    )
    match = re.search(r"Overall exposure level for edged\.service: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.5


def test_install_dry_run_prints_every_step_and_writes_nothing(tmp_path):
    unit_dir = tmp_path / "units"
    out = subprocess.run(
        [sys.executable, "-m", "edged.cli", "install", "--dry-run", "--unit-dir", str(unit_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for step in ("useradd", "/etc/edged", "edged.toml", str(unit_dir / "edged.service"), "daemon-reload", "enable --now edged", "/v2/health/ready"):
        assert step in out.stdout, (step, out.stdout)
    assert not unit_dir.exists()
