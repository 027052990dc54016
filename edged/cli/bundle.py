"""``edged bundle``: inspect, verify (and, from ``edged.cli.fleet``, sign and pack) bundles."""

from __future__ import annotations

from pathlib import Path

import typer

from edged.errors import EdgedError

bundle_app = typer.Typer(help="Inspect and verify model bundles (directories or .tar.gz).", no_args_is_help=True)


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@bundle_app.command("inspect")
def bundle_inspect(path: Path = typer.Argument(..., help="Bundle directory or .tar.gz.")) -> None:
    """Print a bundle's manifest (without checking hashes)."""
    from edged.bundle import open_bundle

    try:
        bundle = open_bundle(path, verify=False)
    except EdgedError as exc:
        _fail(str(exc))
    typer.echo(bundle.manifest.to_json(), nl=False)


@bundle_app.command("verify")
def bundle_verify(path: Path = typer.Argument(..., help="Bundle directory or .tar.gz.")) -> None:
    """Check the manifest and every file's size and sha256; exit 1 naming the first bad file."""
    from edged.bundle import open_bundle

    try:
        bundle = open_bundle(path, verify=True)
    except EdgedError as exc:
        _fail(str(exc))
    m = bundle.manifest
    typer.echo(f"ok: {m.name} {m.version} ({m.runtime}), {len(m.files)} files verified")
