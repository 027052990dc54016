"""What the command modules share."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 1) -> None:
    """One red ``error:`` line on stderr, then exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
