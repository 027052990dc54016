"""Real mosquitto and prometheus-pushgateway processes on loopback ports
(used by the fixtures in tests/e2e/conftest.py and by benchmarks/mqtt.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = "/usr/sbin/mosquitto"
PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"


def wait_port(port: int, timeout: float = 60.0) -> None:
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


def mosquitto(tmp: Path, port: int, persistent: bool = False) -> Process:
    """A stopped mosquitto on 127.0.0.1:port. persistent=True keeps sessions and
    queued QoS 1 messages across its restarts."""
    tmp.mkdir(parents=True, exist_ok=True)
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true"]
    if persistent:
        lines += ["persistence true", f"persistence_location {tmp}/", "max_queued_messages 100000"]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to user mosquitto, who cannot write tmp
    else:
        lines.append("persistence false")
    conf = tmp / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return Process([MOSQUITTO, "-c", str(conf)], port, tmp / "mosquitto.log")


def pushgateway(tmp: Path, port: int) -> Process:
    tmp.mkdir(parents=True, exist_ok=True)
    return Process([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"], port, tmp / "pushgateway.log")
