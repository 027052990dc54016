"""`edged serve` on a port that another process holds: one clear error line that
says how to pick another port, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.helpers import REPO


def test_port_already_taken_says_how_to_pick_another(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "edged.cli", "serve"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO), "EDGED_HTTP_PORT": str(port),
                 "EDGED_MODELS_DIR": str(tmp_path / "models"), "EDGED_STATE_DIR": str(tmp_path / "state")},
        )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot start: port") and f"port {port} on 127.0.0.1 is already in use" in last, out.stderr
    assert "EDGED_HTTP_PORT" in last
    assert "Traceback" not in out.stderr
