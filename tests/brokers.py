"""Real mosquitto and prometheus-pushgateway processes on loopback ports."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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
    cmd: list[str]
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        handle = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=handle, stderr=subprocess.STDOUT)
        wait_port(self.port)
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


def mosquitto(tmp: Path, port: int) -> Process:
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
    return Process([MOSQUITTO, "-c", str(conf)], port, tmp / "mosquitto.log")


def pushgateway(tmp: Path, port: int) -> Process:
    tmp.mkdir(parents=True, exist_ok=True)
    return Process([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"], port, tmp / "pushgateway.log")
