"""`edged install` / `edged uninstall`: put the daemon on a device as a systemd service.

Every step is idempotent (a second run reports it unchanged) and `--dry-run`
prints each one without doing anything.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import typer

UNIT_TEMPLATES = (
    Path(__file__).resolve().parent.parent / "systemd" / "edged.service",  # source checkout
    Path(sys.prefix) / "share" / "edged" / "systemd" / "edged.service",  # wheel install
)
USER = "edged"
CONFIG_DIR = Path("/etc/edged")
STATE_DIR = Path("/var/lib/edged")
DEFAULT_CONFIG = """# edged configuration, written once by `edged install`; your edits are kept.
models_dir = "/var/lib/edged/models"
state_dir = "/var/lib/edged"
load = ["*"]

[http]
host = "127.0.0.1"
port = 8080
"""


@dataclass
class Step:
    what: str  # printed in dry-run and when done
    needed: Callable[[], bool]
    action: Callable[[], None]


def _run(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True)


def _user_exists() -> bool:
    try:
        pwd.getpwnam(USER)
        return True
    except KeyError:
        return False


def unit_text(edged_bin: str, memory_max: str = "1G") -> str:
    """The unit with ExecStart pointing at this venv's edged."""
    template = next((p for p in UNIT_TEMPLATES if p.is_file()), None)
    if template is None:
        raise FileNotFoundError(f"edged.service template not found in {', '.join(map(str, UNIT_TEMPLATES))}")
    text = template.read_text()
    return text.replace("@EDGED_BIN@", edged_bin).replace("@MEMORY_MAX@", memory_max)


def _write(path: Path, text: str) -> Callable[[], None]:
    def action() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return action


def install_steps(config: Optional[Path], venv: Path, unit_dir: Path, memory_max: str, start: bool) -> list[Step]:
    edged_bin = str(venv / "bin" / "edged")
    unit_path = unit_dir / "edged.service"
    unit = unit_text(edged_bin, memory_max)
    config_text = config.read_text() if config else DEFAULT_CONFIG
    target_config = CONFIG_DIR / "edged.toml"
    steps = [
        Step(f"create system user {USER}: useradd --system --no-create-home --home-dir {STATE_DIR} --shell /usr/sbin/nologin {USER}",
             lambda: not _user_exists(),
             lambda: _run("useradd", "--system", "--no-create-home", "--home-dir", str(STATE_DIR), "--shell", "/usr/sbin/nologin", USER)),
        Step(f"create {CONFIG_DIR}", lambda: not CONFIG_DIR.is_dir(), lambda: CONFIG_DIR.mkdir(parents=True)),
        Step(f"create {STATE_DIR / 'models'} owned by {USER}", lambda: not (STATE_DIR / "models").is_dir(),
             lambda: (_run("install", "-d", "-o", USER, "-g", USER, "-m", "0750", str(STATE_DIR), str(STATE_DIR / "models")))),
        Step(f"write {target_config} (only because it is missing; an existing one is never overwritten)",
             lambda: not target_config.exists(), _write(target_config, config_text)),
        Step(f"install unit {unit_path} (ExecStart={edged_bin} serve --config {target_config}, MemoryMax={memory_max})",
             lambda: not unit_path.exists() or unit_path.read_text() != unit, _write(unit_path, unit)),
        Step("systemctl daemon-reload", lambda: True, lambda: _run("systemctl", "daemon-reload")),
    ]
    if start:
        steps.append(Step("systemctl enable --now edged", lambda: True, lambda: _run("systemctl", "enable", "--now", "edged")))
    return steps


def _wait_ready(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _execute(steps: list[Step], dry_run: bool) -> int:
    changed = 0
    for step in steps:
        if not step.needed():
            typer.echo(f"unchanged: {step.what}")
            continue
        if dry_run:
            typer.echo(f"would: {step.what}")
            continue
        step.action()
        changed += 1
        typer.echo(f"done: {step.what}")
    return changed


def _require_root(dry_run: bool) -> None:
    if not dry_run and os.geteuid() != 0:
        typer.secho("error: edged install/uninstall needs root (try sudo, or --dry-run to see the steps)", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def install(
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every step without doing anything."),
    config: Optional[Path] = typer.Option(None, "--config", help="edged.toml to install as /etc/edged/edged.toml when none exists."),
    venv: Path = typer.Option(Path(sys.prefix), "--venv", help="Virtual environment holding edged (default: this one)."),
    unit_dir: Path = typer.Option(Path("/etc/systemd/system"), "--unit-dir", help="Where the unit file goes."),
    memory_max: str = typer.Option("1G", "--memory-max", help="MemoryMax= for the unit (e.g. from the hw-profile budget)."),
    start: bool = typer.Option(True, "--start/--no-start", help="Enable and start the service, then wait for readiness."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for /v2/health/ready."),
) -> None:
    """Install edged as a systemd service: user, directories, config (never
    overwritten), unit, enable and start, then wait until it is ready."""
    _require_root(dry_run)
    if config is not None and not config.is_file():
        typer.secho(f"error: {config}: no such config file", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    steps = install_steps(config, venv.resolve() if not dry_run else venv, unit_dir, memory_max, start)
    _execute(steps, dry_run)
    if dry_run:
        typer.echo("would: wait for http://<http.host>:<http.port>/v2/health/ready, then print systemctl status edged")
        return
    if start:
        from edged.config import load_config

        cfg = load_config(CONFIG_DIR / "edged.toml")
        url = f"http://{cfg.http.host}:{cfg.http.port}/v2/health/ready"
        ok = _wait_ready(url, timeout)
        subprocess.run(["systemctl", "status", "--no-pager", "edged"], check=False)
        if not ok:
            typer.secho(f"error: edged did not become ready at {url} within {timeout:.0f}s (journalctl -u edged)", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        typer.echo(f"ready: {url}")


def uninstall(
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every step without doing anything."),
    unit_dir: Path = typer.Option(Path("/etc/systemd/system"), "--unit-dir", help="Where the unit file is."),
    purge: bool = typer.Option(False, "--purge", help="Also delete /etc/edged, /var/lib/edged and the edged user."),
) -> None:
    """Stop and remove the service; with --purge also the config, state and user."""
    _require_root(dry_run)
    unit_path = unit_dir / "edged.service"
    steps = [
        Step("systemctl disable --now edged", lambda: unit_path.exists(), lambda: _run("systemctl", "disable", "--now", "edged")),
        Step(f"remove {unit_path}", lambda: unit_path.exists(), lambda: unit_path.unlink()),
        Step("systemctl daemon-reload", lambda: True, lambda: _run("systemctl", "daemon-reload")),
    ]
    if purge:
        steps += [
            Step(f"remove {CONFIG_DIR}", lambda: CONFIG_DIR.exists(), lambda: shutil.rmtree(CONFIG_DIR)),
            Step(f"remove {STATE_DIR}", lambda: STATE_DIR.exists(), lambda: shutil.rmtree(STATE_DIR)),
            Step(f"userdel {USER}", _user_exists, lambda: _run("userdel", USER)),
        ]
    _execute(steps, dry_run)
