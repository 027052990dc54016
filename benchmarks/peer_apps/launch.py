"""Starts the servers of the peers section (benchmarks/peers.py) as subprocesses on 127.0.0.1:
edged from this venv, MLServer and the FastAPI app from their venvs under build/peers.

This module runs in the bench's own venv; mlserver_onnx.py and fastapi_app.py beside
it run inside the peers' venvs and never import edged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.helpers import REPO, end_process_group, free_port, start_daemon
from tests.helpers import http as http_request

PEERS_DIR = REPO / "build" / "peers"
APPS = Path(__file__).resolve().parent
PACKAGES = {"edged": ("edged", "aiohttp", "onnxruntime", "numpy"),
            "mlserver": ("mlserver", "fastapi", "uvicorn", "httptools", "orjson", "onnxruntime", "numpy"),
            "fastapi": ("fastapi", "uvicorn", "httptools", "uvloop", "pydantic", "onnxruntime", "numpy")}


@dataclass
class Server:
    """A started server: its port, how to stop it, its log and the package versions it runs."""

    name: str
    port: int
    stop: Callable[[], object]
    log: Path
    versions: dict[str, str] = field(default_factory=dict)


def _versions(python: Path, packages: tuple[str, ...]) -> dict[str, str]:
    """The installed versions of ``packages`` in the venv of ``python`` ({} when it cannot tell)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\nfor p in sys.argv[1:]:\n    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    try:
        done = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout) if done.returncode == 0 else {}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}  # the versions are a note in the section; not knowing them stops nothing


def _wait_ready(proc: subprocess.Popen, port: int, paths: list[str], log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(paths)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {_tail(log)}")
        try:
            if http_request("GET", f"http://127.0.0.1:{port}{pending[0]}", timeout=5.0)[0] == 200:
                pending.pop(0)
                continue
        except OSError:
            pass
        time.sleep(0.2)
    if pending:
        raise RuntimeError(f"not ready after {timeout:.0f} s ({pending[0]}): {_tail(log)}")


def _tail(log: Path, lines: int = 5) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(text[-lines:]) or "no output"


def _spawn(name: str, argv: list[str], cwd: Path, env: dict[str, str], port: int, ready: list[str]) -> Server:
    log = cwd / f"{name}.log"
    with open(log, "ab") as handle:
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, port, lambda: end_process_group(proc), log)
    try:
        _wait_ready(proc, port, ready, log)
    except BaseException:
        server.stop()
        raise
    return server


def _venv(peer: str) -> Path | None:
    venv = PEERS_DIR / f"{peer}-venv"
    return venv if (venv / ".stamp").exists() and (venv / "bin" / "python").exists() else None


def start_mlserver(work: Path, models_dir: Path, models: list[str]) -> Server:
    venv = _venv("mlserver")
    if venv is None:
        raise RuntimeError(f"{PEERS_DIR / 'mlserver-venv'} is not installed (make install-peers)")
    root = work / "mlserver"
    port = free_port()
    settings = {"debug": False, "parallel_workers": 0, "host": "127.0.0.1", "http_port": port,
                "grpc_port": free_port(), "metrics_port": free_port(), "load_models_at_startup": True}
    root.mkdir(parents=True)
    (root / "settings.json").write_text(json.dumps(settings))
    for name in models:
        (root / name).mkdir()
        (root / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_onnx.OnnxModel",
            "parameters": {"uri": str(models_dir / name / "model.onnx")}}))
    server = _spawn("mlserver", [str(venv / "bin" / "mlserver"), "start", str(root)], root,
                    {"PYTHONPATH": str(APPS)}, port, [f"/v2/models/{m}/ready" for m in models])
    server.versions = _versions(venv / "bin" / "python", PACKAGES["mlserver"])
    return server


def start_fastapi(work: Path, models_dir: Path, models: list[str]) -> Server:
    venv = _venv("fastapi")
    if venv is None:
        raise RuntimeError(f"{PEERS_DIR / 'fastapi-venv'} is not installed (make install-peers)")
    root = work / "fastapi"
    root.mkdir(parents=True)
    port = free_port()
    argv = [str(venv / "bin" / "python"), "-m", "uvicorn", "fastapi_app:app", "--app-dir", str(APPS),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning"]
    server = _spawn("fastapi", argv, root, {"PEER_MODELS_DIR": str(models_dir)}, port, ["/v2/health/ready"])
    server.versions = _versions(venv / "bin" / "python", PACKAGES["fastapi"])
    return server


def start_edged(work: Path, models_dir: Path, models: list[str]) -> Server:
    daemon = start_daemon(work / "edged", models_dir)
    return Server("edged", daemon.port, daemon.stop, daemon.log, _versions(Path(sys.executable), PACKAGES["edged"]))


STARTERS = {"edged": start_edged, "mlserver": start_mlserver, "fastapi": start_fastapi}
