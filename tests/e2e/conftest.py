"""Fixtures for the e2e tests: real mosquitto and prometheus-pushgateway
processes on free loopback ports (the daemon fixtures live in the test modules
and in tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.helpers import free_port

MOSQUITTO = "/usr/sbin/mosquitto"
PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Process:
    """A server process that can be stopped and started again on the same port."""

    cmd: list[str]
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        with open(self.log, "ab") as handle:
            self.proc = subprocess.Popen(self.cmd, stdout=handle, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"{self.cmd[0]} did not start:\n{self.log.read_text()}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _need(binary: str, package: str) -> None:
    if not os.path.exists(binary):
        pytest.skip(f"{binary} not installed (Debian package {package})")


@pytest.fixture(scope="module")
def mosquitto_factory(tmp_path_factory) -> Iterator[Callable[..., Process]]:
    """make(persistent=False) -> a stopped mosquitto Process on a free port.
    persistent=True keeps sessions and queued QoS 1 messages across its restarts."""
    _need(MOSQUITTO, "mosquitto")
    made: list[Process] = []

    def make(persistent: bool = False) -> Process:
        port = free_port()
        tmp = tmp_path_factory.mktemp("mosquitto")
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true"]
        if persistent:
            lines += ["persistence true", f"persistence_location {tmp}/", "max_queued_messages 10000"]
            if os.geteuid() == 0:
                lines.append("user root")  # else mosquitto drops to 'mosquitto', who cannot write tmp
        else:
            lines.append("persistence false")
        (tmp / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        proc = Process([MOSQUITTO, "-c", str(tmp / "mosquitto.conf")], port, tmp / "mosquitto.log")
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture(scope="module")
def mqtt_broker(mosquitto_factory) -> Process:
    """One running mosquitto for a test module."""
    return mosquitto_factory().start()


@pytest.fixture()
def pushgateway_factory(tmp_path_factory) -> Iterator[Callable[[], Process]]:
    """make() -> a stopped prometheus-pushgateway Process on a free port."""
    _need(PUSHGATEWAY, "prometheus-pushgateway")
    made: list[Process] = []

    def make() -> Process:
        port = free_port()
        tmp = tmp_path_factory.mktemp("pushgateway")
        proc = Process([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"], port, tmp / "pushgateway.log")
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()
