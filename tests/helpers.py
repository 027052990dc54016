"""Shared test helpers: free ports, the daemon as a real subprocess."""

from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
DEMO_BUNDLES = REPO / "build" / "demo-bundles"
DEMO_DATA = REPO / "build" / "demo-data"
DEMO_MODELS = ("digits-onnx", "digits-tflite", "digits-openvino")

# Every daemon start_daemon() started; the e2e conftest ends any still running after
# each test, and this module at exit, so a failed test never leaves one behind.
STARTED: list["DaemonProcess"] = []


def end_leftover_daemons() -> list[str]:
    """Stop every daemon started here that is still running; returns their configs."""
    left = [d for d in STARTED if d.alive()]
    for daemon in left:
        daemon.stop()
    STARTED[:] = [d for d in STARTED if d.alive()]
    return [str(d.config) for d in left]


atexit.register(end_leftover_daemons)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_concurrently(calls: Sequence[Callable[[], T]], workers: int = 3) -> list[T]:
    """Run independent ``calls`` (each typically one CLI subprocess) on a few threads
    and return their results in the order given. Their interpreter start-ups and waits
    overlap; every call runs to its end before this returns, and the first exception
    (in that order) is raised after all have ended, so no process is left behind."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(calls)))) as pool:
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]


def end_process_group(proc: subprocess.Popen, first: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """End ``proc`` (started with ``start_new_session=True``) and everything in its
    process group, whatever state it is in: ``first``, then SIGKILL after ``timeout``.
    SIGTERM and SIGKILL reach it even where the test run itself ignores SIGINT
    (``make test &``)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, first)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its group, or the process itself
    except (ProcessLookupError, PermissionError):
        pass
    return proc.wait()


class LineReader:
    """Reads a text stream line by line on a thread, so a test can wait for a line
    with a bound instead of sleeping and hoping the process was fast enough."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 60.0) -> bool:
        """True once a line containing ``text`` was read; False at the end of the
        stream or after ``timeout`` seconds."""
        if any(text in line for line in self.lines):
            return True
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                self._queue.put(None)  # the stream stays ended for later calls
                return False
            self.lines.append(line)
            if text in line:
                return True
        return False

    def text(self, timeout: float = 10.0) -> str:
        """Everything read so far (after waiting up to ``timeout`` for the stream to end)."""
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes, dict[str, str]]:
    """One raw HTTP request (like curl); returns status, body, headers."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@dataclass
class DaemonProcess:
    proc: subprocess.Popen
    port: int
    config: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, dict]:
        status, body, _ = http("GET", self.url + path)
        return status, json.loads(body) if body else {}

    def post(self, path: str, data: object | bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        status, body, _ = http("POST", self.url + path, raw, headers)
        try:
            return status, json.loads(body) if body else {}
        except ValueError:
            return status, {"raw": body}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_daemon(tmp: Path, models_dir: Path, extra_toml: str = "", env: dict[str, str] | None = None, wait: bool = True, port: int | None = None) -> DaemonProcess:
    """Start `edged serve` as a subprocess on a free port and wait until ready."""
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "edged.toml"
    config.write_text(
        f'models_dir = "{models_dir}"\nstate_dir = "{tmp / "state"}"\nthreads = 1\n{extra_toml}\n'
        f"[http]\nport = {port}\n"
    )
    log = tmp / "daemon.log"
    handle = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged.cli", "serve", "--config", str(config)],
        stdout=handle, stderr=subprocess.STDOUT, cwd=tmp,
        env={**os.environ, **(env or {})},
    )
    daemon = DaemonProcess(proc=proc, port=port, config=config, log=log)
    STARTED.append(daemon)
    if wait:
        wait_ready(daemon)
    return daemon


def wait_ready(daemon: DaemonProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.logs()}")
        try:
            status, _, _ = http("GET", daemon.url + "/v2/health/ready", timeout=5.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    daemon.stop()
    raise RuntimeError(f"daemon not ready after {timeout}s:\n{daemon.logs()}")
