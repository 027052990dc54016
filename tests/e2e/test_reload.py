"""`systemctl reload` (SIGHUP) during a slow model load (issue 15, defect 12):
the daemon must never stop on a reload. A slow load is held open with the
registry's EDGED_TEST_LOAD_GATE hook (loads wait while the file exists), so the
test decides when loading ends instead of racing a clock. And the unit restarts
the daemon after any exit systemd did not ask for, with a start-rate limit."""

from __future__ import annotations

import configparser
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

from tests.e2e.test_systemd import NotifyListener
from tests.helpers import REPO, http, start_daemon
from tests.unit.tiny_model import write_tiny_bundle

BODY = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}'


class Client(threading.Thread):
    """Sends inference requests back to back and counts the answers."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.ok, self.failed, self.errors = url, 0, 0, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status = http("POST", self.url + "/v2/models/tiny/infer", BODY,
                              {"Content-Type": "application/json"}, timeout=30)[0]
            except OSError as exc:
                status = repr(exc)
            if status == 200:
                self.ok += 1
            else:
                self.failed += 1
                self.errors.append(status)


def _wait(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sighup_during_a_slow_load_never_stops_the_daemon(tmp_path):
    models = tmp_path / "models"
    write_tiny_bundle(models / "tiny")
    gate = tmp_path / "gate"
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    daemon = start_daemon(tmp_path / "d", models, env={
        "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "2000000", "EDGED_TEST_LOAD_GATE": str(gate)})
    client = Client(daemon.url)
    try:
        _wait(lambda: listener.lines("READY=1"), "READY=1 at start-up")
        client.start()
        _wait(lambda: client.ok >= 5, "requests before the reload")
        gate.write_text("")  # from now on every model load is held
        daemon.proc.send_signal(signal.SIGHUP)
        _wait(lambda: "reloading models" in daemon.logs(), "the reload to start")
        for n in (1, 2, 3):  # more reloads requested (systemctl reload again) while the first is held
            daemon.proc.send_signal(signal.SIGHUP)  # one at a time: pending signals would merge
            _wait(lambda: daemon.logs().count("one more pass follows") == n, f"SIGHUP {n} to be folded")
        served = client.ok
        _wait(lambda: client.ok >= served + 5, "requests during the held reload")
        assert daemon.alive()
        assert http("GET", daemon.url + "/v2/health/live")[0] == 200
        assert len(listener.lines("RELOADING=1")) == 1  # one reload at a time
        assert not listener.lines("STOPPING=1") and "stopping" not in daemon.logs()

        gate.unlink()  # the slow load finishes
        _wait(lambda: len(listener.lines("READY=1")) == 2, "READY=1 after the reload")
        _wait(lambda: daemon.logs().count("reloaded: 1 model version") == 2, "the folded pass")
        assert daemon.alive() and not listener.lines("STOPPING=1")
        assert len(listener.lines("RELOADING=1")) == 1 and len(listener.lines("READY=1")) == 2
        served = client.ok
        _wait(lambda: client.ok >= served + 5, "requests after the reload")
        client.done.set()
        client.join(60)
        assert client.failed == 0, client.errors[:5]

        assert daemon.stop(signal.SIGTERM) == 0
        assert "stop requested by SIGTERM" in daemon.logs()
        _wait(lambda: listener.lines("STOPPING=1"), "STOPPING=1")
    finally:
        client.done.set()
        gate.unlink(missing_ok=True)
        daemon.stop()
        listener.close()


def test_stop_during_a_slow_reload_waits_for_it_and_exits_cleanly(tmp_path):
    models = tmp_path / "models"
    write_tiny_bundle(models / "tiny")
    gate = tmp_path / "gate"
    daemon = start_daemon(tmp_path / "d", models, env={"EDGED_TEST_LOAD_GATE": str(gate)})
    try:
        gate.write_text("")
        daemon.proc.send_signal(signal.SIGHUP)
        _wait(lambda: "reloading models" in daemon.logs(), "the reload to start")
        daemon.proc.send_signal(signal.SIGTERM)
        _wait(lambda: "waiting for the reload in progress" in daemon.logs(), "the stop to wait for the reload")
        assert daemon.alive()
        gate.unlink()
        assert daemon.proc.wait(60) == 0
        logs = daemon.logs()
        assert logs.index("waiting for the reload") < logs.index("reloaded: 1 model version")
        assert "Traceback" not in logs
    finally:
        gate.unlink(missing_ok=True)
        daemon.stop()


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(REPO / "systemd" / "edged.service")
    return parser


def test_unit_restarts_after_any_exit_with_a_start_rate_limit():
    """A clean exit that systemd did not ask for left the service dead
    (Restart=on-failure ignores exit 0)."""
    unit = _unit()
    assert unit["Service"]["Restart"] == "always"
    assert int(unit["Unit"]["StartLimitBurst"]) >= 3
    interval = unit["Unit"]["StartLimitIntervalSec"]
    assert re.fullmatch(r"\d+(s|min)?", interval), interval
    seconds = int(re.match(r"\d+", interval)[0]) * (60 if interval.endswith("min") else 1)
    restart_sec = float(unit["Service"]["RestartSec"])
    # The limit must be reachable by a crash loop: Burst restarts fit inside the interval.
    assert seconds > int(unit["Unit"]["StartLimitBurst"]) * restart_sec


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies_and_exposure_stays_at_most_1_5():
    unit = REPO / "systemd" / "edged.service"
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for edged\.service: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    assert float(match[1]) <= 1.5
