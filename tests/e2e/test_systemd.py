"""systemd integration without a VM: sd_notify over a real datagram socket
bound as $NOTIFY_SOCKET, the unit checked by systemd-analyze, and
`edged install --dry-run`."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from edged.cli.install import unit_text
from tests.helpers import REPO, free_port, http, start_daemon
from tests.unit.tiny_model import write_tiny_bundle


class NotifyListener:
    """Collects (time, message) datagrams sent to a real AF_UNIX socket."""

    def __init__(self, path: str) -> None:
        """``path``: a filesystem path, or "@name" for an abstract socket."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.sock.settimeout(0.2)
        self.path = path  # what goes into $NOTIFY_SOCKET
        self.messages: list[tuple[float, str]] = []
        # Did /v2/health/ready and the model answer 200 when READY=1 arrived?
        self.on_ready: list[bool] = []
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
                try:
                    health = http("GET", self.url + "/v2/health/ready", timeout=30)[0]
                    model = http("GET", self.url + "/v2/models/tiny/ready", timeout=30)[0]
                    self.on_ready.append(health == 200 and model == 200)
                except OSError:
                    self.on_ready.append(False)
            self.messages.append((time.monotonic(), data))

    def lines(self, prefix: str) -> list[str]:
        return [m for _, m in self.messages if m.startswith(prefix)]

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def _notify_address(kind: str, tmp_path) -> str:
    if kind == "path":
        return str(tmp_path / "notify.sock")
    return f"@edged-test-{os.getpid()}-{time.monotonic_ns()}"


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_ready_status_watchdog_reload_stopping(tmp_path, kind):
    write_tiny_bundle(tmp_path / "models" / "tiny")
    listener = NotifyListener(_notify_address(kind, tmp_path))
    port = free_port()
    listener.url = f"http://127.0.0.1:{port}"
    daemon = None
    try:
        started = time.monotonic()
        daemon = start_daemon(
            tmp_path / "d", tmp_path / "models", port=port, wait=False,
            env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "400000"},
        )
        deadline = time.monotonic() + 60
        while not listener.lines("READY=1") and time.monotonic() < deadline and daemon.alive():
            time.sleep(0.05)
        assert listener.lines("READY=1"), (listener.messages, daemon.logs())
        assert listener.on_ready == [True], "READY=1 came before /v2/health/ready answered 200"
        statuses = listener.lines("STATUS=")
        assert any("loading models" in m for m in statuses), statuses
        assert any("ready: 1 model version" in m for m in statuses), statuses
        first_ready = next(i for i, (_, m) in enumerate(listener.messages) if m.startswith("READY=1"))
        first_loading = next(i for i, (_, m) in enumerate(listener.messages) if "loading models" in m)
        assert first_loading < first_ready

        # Pings keep coming (3 more, however slow the machine), and never faster than one
        # per 0.2 s (half of WATCHDOG_USEC) since the daemon started: load only slows them.
        seen = len(listener.lines("WATCHDOG=1"))
        deadline = time.monotonic() + 60
        while len(listener.lines("WATCHDOG=1")) < seen + 3 and time.monotonic() < deadline and daemon.alive():
            time.sleep(0.05)
        pings = len(listener.lines("WATCHDOG=1"))
        assert pings >= seen + 3, f"only {pings - seen} more WATCHDOG=1 in 60 s"
        assert pings <= (time.monotonic() - started) / 0.2 + 2, f"{pings} pings in {time.monotonic() - started:.1f} s"

        # SIGHUP (ExecReload): RELOADING=1, then READY=1 again once models are reloaded.
        before = len(listener.messages)
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while len(listener.lines("READY=1")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = [m for _, m in listener.messages[before:] if not m.startswith(("WATCHDOG", "STATUS"))]
        assert after[:2] and after[0].startswith("RELOADING=1") and after[1].startswith("READY=1"), after
        assert "MONOTONIC_USEC=" in after[0]

        assert daemon.stop(signal.SIGTERM) == 0, daemon.logs()
        deadline = time.monotonic() + 30  # sent before the daemon exited: only the listener thread may lag
        while not listener.lines("STOPPING=1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.lines("STOPPING=1")
        stopping = next(i for i, (_, m) in enumerate(listener.messages) if m.startswith("STOPPING=1"))
        assert not any(m.startswith("READY=1") for _, m in listener.messages[stopping:])
    finally:
        if daemon is not None:
            daemon.stop()
        listener.close()


def test_corrupt_model_starts_not_ready_and_status_says_why(tmp_path):
    write_tiny_bundle(tmp_path / "models" / "good")
    bad = write_tiny_bundle(tmp_path / "models" / "bad", name="bad")
    model_file = bad.root / bad.manifest.model_file
    model_file.write_bytes(model_file.read_bytes()[:-3] + b"xyz")  # the hash no longer matches
    (tmp_path / "models" / "junk").mkdir()
    (tmp_path / "models" / "junk" / "manifest.json").write_text("{not json")
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    daemon = None
    try:
        daemon = start_daemon(tmp_path / "d", tmp_path / "models", wait=False, env={"NOTIFY_SOCKET": listener.path})
        deadline = time.monotonic() + 60
        while not listener.lines("READY=1") and time.monotonic() < deadline and daemon.alive():
            time.sleep(0.05)
        assert listener.lines("READY=1"), (listener.messages, daemon.logs())
        status = [m for m in listener.lines("STATUS=") if m.startswith("STATUS=ready")][-1]
        assert "not ready: bad 1.0.0" in status and "sha256" in status, status
        assert "unusable bundles" in status and "junk" in status and "not valid JSON" in status, status
        assert daemon.get("/v2/models/bad/ready")[0] == 503
        assert daemon.get("/v2/models/tiny/ready")[0] == 200
    finally:
        if daemon is not None:
            daemon.stop()
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
    """The unit as `edged install --venv .venv` renders it (ExecStart must exist for verify)."""
    venv = REPO / ".venv" if (REPO / ".venv" / "bin" / "edged").exists() else __import__("pathlib").Path(sys.prefix)
    unit = tmp_path / "edged.service"
    unit.write_text(unit_text(str(venv / "bin" / "edged")))
    return unit


def _exposure(unit) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for edged\.service: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    return float(match.group(1))


needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (make system-deps)")


@needs_analyze
def test_unit_verifies(tmp_path):
    unit = _rendered_unit(tmp_path)
    assert "ExecStart=/opt/edged" not in unit.read_text()
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "edged.service" not in out.stderr, out.stderr  # no warnings about our unit


@needs_analyze
def test_security_exposure_at_most_2_5(tmp_path):
    assert _exposure(REPO / "systemd" / "edged.service") <= 2.5
    assert _exposure(_rendered_unit(tmp_path)) <= 2.5


@needs_analyze
def test_jetson_drop_in_verifies(tmp_path):
    unit = _rendered_unit(tmp_path)
    drop_in = tmp_path / "edged.service.d" / "jetson-gpu.conf"
    drop_in.parent.mkdir()
    shutil.copy(REPO / "systemd" / "jetson-gpu.conf.example", drop_in)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert _exposure(unit) <= 2.5


def test_install_dry_run_prints_every_step_and_writes_nothing(tmp_path):
    unit_dir = tmp_path / "units"
    etc_before = os.path.exists("/etc/edged/edged.toml")
    out = subprocess.run(
        [sys.executable, "-m", "edged.cli", "install", "--dry-run", "--unit-dir", str(unit_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for step in ("useradd --system --no-create-home", "/var/lib/edged/models", "edged.toml",
                 str(unit_dir / "edged.service"), "daemon-reload", "enable --now edged", "/v2/health/ready"):
        assert step in out.stdout, (step, out.stdout)
    assert not unit_dir.exists()
    assert os.path.exists("/etc/edged/edged.toml") == etc_before


def test_install_steps_are_idempotent_and_keep_config_edits(tmp_path, capsys):
    """The real install plan against temporary directories; external commands
    other than `install -d` are recorded, not run (no systemd as PID 1 here)."""
    from edged.cli import install as cli_install

    user = pwd.getpwuid(os.getuid()).pw_name
    ran: list[list[str]] = []

    def run(cmd: list[str]) -> None:
        ran.append(cmd)
        if cmd[0] == "install":
            subprocess.run(cmd, check=True)

    def plan():
        return cli_install.install_steps(
            cli_install.DEFAULT_CONFIG, REPO / ".venv", tmp_path / "units", "512M", start=False,
            config_dir=tmp_path / "etc", state_dir=tmp_path / "state", user=user, run=run,
        )

    assert cli_install.execute(plan(), dry_run=False) >= 4
    unit = (tmp_path / "units" / "edged.service").read_text()
    assert f"ExecStart={REPO / '.venv' / 'bin' / 'edged'} serve --config /etc/edged/edged.toml" in unit
    assert "MemoryMax=512M" in unit
    assert (tmp_path / "state" / "models").is_dir()
    assert ["systemctl", "daemon-reload"] in ran
    config = tmp_path / "etc" / "edged.toml"
    config.write_text(config.read_text() + "threads = 2\n")  # a local edit
    ran.clear()
    capsys.readouterr()

    assert cli_install.execute(plan(), dry_run=False) == 0
    out = capsys.readouterr().out
    assert out.count("unchanged:") == len(plan()) and "done:" not in out, out
    assert ran == []
    assert config.read_text().endswith("threads = 2\n")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to run as nobody")
def test_install_without_root_fails_clearly(tmp_path):
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "edged.cli", "install", "--unit-dir", str(tmp_path / "units")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 1, out
    assert "needs root" in out.stderr and "--dry-run" in out.stderr
    assert not (tmp_path / "units").exists()
