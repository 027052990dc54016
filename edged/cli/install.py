"""`edged install` / `edged uninstall`: put the daemon on a device as a systemd service.

Every step checks first whether it is needed, so a second run changes nothing
and reports each step "unchanged"; `--dry-run` prints each step (every command
and file write) without doing anything.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

UNIT_TEMPLATES = (
    Path(__file__).resolve().parents[2] / "systemd" / "edged.service",  # source checkout
    Path(sys.prefix) / "share" / "edged" / "systemd" / "edged.service",  # wheel install
)
TEMPLATE_BIN = "/opt/edged/venv/bin/edged"
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

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

# Every external command goes through here (tests record instead of running).
Runner = Callable[[list[str]], None]


def run_command(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True)


@dataclass
class Step:
    what: str  # printed as "would:", "done:" or "unchanged:"
    needed: Callable[[], bool]
    action: Callable[[], None]


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def _systemctl_state(verb: str, unit: str = "edged") -> str:
    """`systemctl is-enabled/is-active edged`, or "" when systemctl cannot answer."""
    try:
        out = subprocess.run(["systemctl", verb, unit], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def unit_text(edged_bin: str, memory_max: str = "1G") -> str:
    """systemd/edged.service with ExecStart pointing at ``edged_bin`` and MemoryMax set."""
    template = next((p for p in UNIT_TEMPLATES if p.is_file()), None)
    if template is None:
        raise FileNotFoundError(f"edged.service template not found in {', '.join(map(str, UNIT_TEMPLATES))}")
    text = template.read_text().replace(f"ExecStart={TEMPLATE_BIN} ", f"ExecStart={edged_bin} ")
    return re.sub(r"(?m)^MemoryMax=.*$", f"MemoryMax={memory_max}", text)


def _write(path: Path, text: str, mode: int, group: str | None = None) -> Callable[[], None]:
    def action() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        if group is not None:
            try:
                os.chown(tmp, -1, grp.getgrnam(group).gr_gid)
            except (KeyError, PermissionError):
                pass
        os.replace(tmp, path)

    return action


def install_steps(
    config_text: str, venv: Path, unit_dir: Path, memory_max: str, start: bool,
    config_dir: Path = CONFIG_DIR, state_dir: Path = STATE_DIR, user: str = USER,
    run: Runner = run_command,
) -> list[Step]:
    """The install plan. Each step's ``needed`` is evaluated right before it runs."""
    edged_bin = str(venv / "bin" / "edged")
    unit_path = unit_dir / "edged.service"
    unit = unit_text(edged_bin, memory_max)
    target_config = config_dir / "edged.toml"
    models = state_dir / "models"
    unit_changed = not unit_path.exists() or unit_path.read_text() != unit
    was_active = _systemctl_state("is-active") == "active" if start else False
    useradd = ["useradd", "--system", "--no-create-home", "--home-dir", str(state_dir), "--shell", "/usr/sbin/nologin", user]
    mkstate = ["install", "-d", "-o", user, "-g", user, "-m", "0750", str(state_dir), str(models)]
    steps = [
        Step(f"create system user {user}: {' '.join(useradd)}", lambda: not _user_exists(user), lambda: run(useradd)),
        Step(f"create {config_dir}", lambda: not config_dir.is_dir(), lambda: config_dir.mkdir(parents=True, mode=0o755)),
        Step(f"create {config_dir / 'trusted-keys'} (OTA: public keys whose bundle signatures are accepted)",
             lambda: not (config_dir / "trusted-keys").is_dir(),
             lambda: (config_dir / "trusted-keys").mkdir(parents=True, mode=0o755)),
        Step(f"create {models}: {' '.join(mkstate)}", lambda: not models.is_dir(), lambda: run(mkstate)),
        Step(f"write {target_config} (mode 0640, group {user}; only when missing, an existing one is never overwritten)",
             lambda: not target_config.exists(), _write(target_config, config_text, 0o640, user)),
        Step(f"write unit {unit_path} (ExecStart={edged_bin} serve --config /etc/edged/edged.toml, MemoryMax={memory_max})",
             lambda: unit_changed, _write(unit_path, unit, 0o644)),
        Step("systemctl daemon-reload", lambda: unit_changed, lambda: run(["systemctl", "daemon-reload"])),
    ]
    if start:
        steps.append(Step(
            "systemctl enable --now edged",
            lambda: not (_systemctl_state("is-enabled") == "enabled" and _systemctl_state("is-active") == "active"),
            lambda: run(["systemctl", "enable", "--now", "edged"]),
        ))
        steps.append(Step("systemctl restart edged (only when the unit changed while edged was running)",
                          lambda: unit_changed and was_active, lambda: run(["systemctl", "restart", "edged"])))
    return steps


def execute(steps: list[Step], dry_run: bool) -> int:
    """Run the needed steps (or print them with dry_run); returns how many changed something."""
    changed = 0
    for step in steps:
        if not step.needed():
            console.print(f"[dim]unchanged:[/] {escape(step.what)}")
            continue
        if dry_run:
            console.print(f"[yellow]would:[/] {escape(step.what)}")
            changed += 1
            continue
        step.action()
        changed += 1
        console.print(f"[green]done:[/] {escape(step.what)}")
    return changed


def ready_url(config_text: str) -> str:
    """The /v2/health/ready URL of the daemon that ``config_text`` configures."""
    http = tomllib.loads(config_text).get("http", {})
    host = http.get("host", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{http.get('port', 8080)}/v2/health/ready"


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


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _require_root(dry_run: bool, what: str) -> None:
    if not dry_run and os.geteuid() != 0:
        _fail(f"edged {what} changes system files and needs root: run it with sudo (or add --dry-run to see the steps)")


def install(
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every step (commands and file writes) without doing anything."),
    config: Optional[Path] = typer.Option(None, "--config", help="edged.toml to install as /etc/edged/edged.toml when none exists (default: a minimal one)."),
    venv: Path = typer.Option(Path(sys.prefix), "--venv", help="Virtual environment holding edged (default: this one)."),
    unit_dir: Path = typer.Option(Path("/etc/systemd/system"), "--unit-dir", help="Where the unit file goes."),
    memory_max: str = typer.Option("1G", "--memory-max", help="MemoryMax= for the unit (e.g. from the hw-profile's memory budget)."),
    start: bool = typer.Option(True, "--start/--no-start", help="Enable and start the service, then wait until it is ready."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for /v2/health/ready."),
) -> None:
    """Install edged as a systemd service: user, directories, config (never
    overwritten), unit, daemon-reload, enable --now, then wait until ready."""
    _require_root(dry_run, "install")
    if config is not None:
        from edged.config import load_config
        from edged.errors import EdgedError

        try:
            load_config(config, environ={})
        except EdgedError as exc:
            _fail(str(exc), 2)
        config_text = config.read_text()
    else:
        config_text = DEFAULT_CONFIG
    if not (venv / "bin" / "edged").exists():
        _fail(f"{venv / 'bin' / 'edged'} does not exist: pass --venv with the virtual environment edged is installed in", 2)
    target_config = CONFIG_DIR / "edged.toml"
    steps = install_steps(config_text, venv.absolute(), unit_dir, memory_max, start)
    changed = execute(steps, dry_run)
    effective = target_config.read_text() if target_config.exists() else config_text
    url = ready_url(effective)
    if dry_run:
        if start:
            console.print(f"[yellow]would:[/] wait for {url}, then print systemctl status edged")
        console.print("dry run: nothing was changed")
        return
    console.print("[bold]unchanged[/]: nothing to do" if changed == 0 else f"[bold]{changed} step(s) changed[/]")
    if start:
        ok = _wait_ready(url, timeout)
        subprocess.run(["systemctl", "status", "--no-pager", "edged"], check=False)
        if not ok:
            _fail(f"edged did not become ready at {url} within {timeout:.0f}s; see journalctl -u edged")
        console.print(f"[green]ready:[/] {url}")


def uninstall(
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every step without doing anything."),
    unit_dir: Path = typer.Option(Path("/etc/systemd/system"), "--unit-dir", help="Where the unit file is."),
    purge: bool = typer.Option(False, "--purge", help="Also delete /etc/edged, /var/lib/edged (models included) and the edged user."),
) -> None:
    """Stop and remove the service; with --purge also the config, state and user."""
    _require_root(dry_run, "uninstall")
    unit_path = unit_dir / "edged.service"
    had_unit = unit_path.exists()
    steps = [
        Step("systemctl disable --now edged", lambda: had_unit, lambda: run_command(["systemctl", "disable", "--now", "edged"])),
        Step(f"remove {unit_path}", lambda: unit_path.exists(), lambda: unit_path.unlink()),
        Step("systemctl daemon-reload", lambda: had_unit, lambda: run_command(["systemctl", "daemon-reload"])),
    ]
    if purge:
        steps += [
            Step(f"remove {CONFIG_DIR}", lambda: CONFIG_DIR.exists(), lambda: shutil.rmtree(CONFIG_DIR)),
            Step(f"remove {STATE_DIR}", lambda: STATE_DIR.exists(), lambda: shutil.rmtree(STATE_DIR)),
            Step(f"userdel {USER}", lambda: _user_exists(USER), lambda: run_command(["userdel", USER])),
        ]
    changed = execute(steps, dry_run)
    if dry_run:
        console.print("dry run: nothing was changed")
    elif changed == 0:
        console.print("[bold]unchanged[/]: edged is not installed")
