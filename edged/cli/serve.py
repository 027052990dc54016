"""``edged serve`` without the command-line framework.

The daemon is the one command that stays resident, so it should not carry what
the other commands need: typer, rich, and pydantic (typer 0.29 coerces every
option value through a pydantic adapter) add about 13 MB of RSS to a process
that never prints help. ``edged.cli.entry`` runs a plain ``edged serve
[--config PATH]`` here; anything else (``--help``, a typo) goes to typer, which
prints its usual help and errors. This module imports only the standard library
at import time.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path

CONFIG_ENV = "EDGED_CONFIG"


@dataclass(frozen=True)
class ServeArgs:
    """What a plain ``edged serve`` command line asked for."""

    config: Path | None


def plain_serve_args(argv: list[str], environ: dict[str, str] | None = None) -> ServeArgs | None:
    """``argv`` (without the program name) when it is ``serve``, ``serve --config
    PATH``, ``serve -c PATH`` or ``serve --config=PATH``; None for anything else.
    Without an option, a non-empty EDGED_CONFIG names the file (as typer reads it)."""
    environ = os.environ if environ is None else environ
    if not argv or argv[0] != "serve":
        return None
    rest = argv[1:]
    if not rest:
        value = environ.get(CONFIG_ENV)
        return ServeArgs(Path(value) if value else None)
    if len(rest) == 2 and rest[0] in ("--config", "-c") and not rest[1].startswith("-"):
        return ServeArgs(Path(rest[1]))
    if len(rest) == 1 and rest[0].startswith("--config=") and len(rest[0]) > len("--config="):
        return ServeArgs(Path(rest[0].split("=", 1)[1]))
    return None


def _error(message: str) -> None:
    """One ``error:`` line on stderr, red on a terminal (as edged.cli.common.fail)."""
    line = f"error: {message}"
    if sys.stderr.isatty():
        line = f"\033[31m{line}\033[0m"
    print(line, file=sys.stderr, flush=True)


def run_serve(config: Path | None) -> int:
    """Load the config, attach the optional services and run the daemon in the
    foreground until SIGTERM/SIGINT. Returns the exit code: 0 after a stop, 2 for
    an invalid config, 1 when the daemon cannot start."""
    import asyncio
    import logging

    from edged.config import load_config
    from edged.errors import EdgedError

    try:
        cfg = load_config(config)
    except EdgedError as exc:
        _error(str(exc))
        return 2
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from edged import extensions
    from edged.daemon import Daemon

    daemon = Daemon(cfg, str(config) if config else None)
    extensions.attach(daemon)
    try:
        asyncio.run(daemon.run())
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _error(f"cannot start: port {cfg.http.port} on {cfg.http.host} is already in use (another edged?); "
                   f"pick another with EDGED_HTTP_PORT=PORT or `port` under [http] in edged.toml")
        else:
            _error(f"cannot start: {exc}")
        return 1
    return 0
