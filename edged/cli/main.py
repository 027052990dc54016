"""The ``edged`` command line."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from edged.cli.common import fail

from edged import __version__
from edged.cli.bundle import bundle_app
from edged.errors import EdgedError

def _hide_flag_types() -> None:
    """typer 0.29's help panel prints a value type for every option, so each flag
    (--dry-run, --help) reads `<bool>` as if it took a value. Flags take none: show
    no type for them, as click's plain help does. A no-op where typer lacks the hook."""
    try:
        from typer.core import TyperOption
    except ImportError:
        return
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "hides_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich.hides_flags = True
    TyperOption.display_type_rich = display_type_rich


_hide_flag_types()
# "markdown": help paragraphs are reflowed to the terminal's width (in "rich" mode the
# docstrings' own line breaks stay and the text comes out ragged); `code` and \[ work.
app = typer.Typer(
    help="edged: serve quantized TFLite, ONNX and OpenVINO bundles on edge devices over "
    "KServe V2 HTTP and MQTT.\n\nStart with `edged doctor`, then `edged serve --config edged.toml`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
models_app = typer.Typer(help="Ask a running daemon about its models.", no_args_is_help=True)
profiles_app = typer.Typer(help="Hardware profiles (hw-profiles/*.toml): what each target runs.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(bundle_app, name="bundle")
app.add_typer(profiles_app, name="profiles")

URL_OPTION = typer.Option("http://127.0.0.1:8080", "--url", envvar="EDGED_URL", help="Base URL of the daemon.")


_fail = fail


from edged.cli.install import install, uninstall  # noqa: E402

app.command()(install)
app.command()(uninstall)


@app.command()
def version() -> None:
    """Print the edged version."""
    typer.echo(__version__)


@app.command()
def rollback(
    model: str = typer.Argument(..., help="Model name, e.g. digits."),
    to: Optional[str] = typer.Option(None, "--to", help="Version to go back to (default: the one before the active version)."),
    url: str = URL_OPTION,
) -> None:
    """Switch a model back to an earlier installed OTA version on a running daemon.

    The new (bad) release is remembered as rolled back, so its retained fleet message
    does not re-apply it; publish again to retry it. Example: `edged rollback digits --to 1.0.0`.
    """
    from edged.client import ClientError, V2Client

    try:
        result = V2Client(url).post_json(f"/v2/repository/models/{model}/rollback", {"version": to} if to else {})
    except ClientError as exc:
        _fail(str(exc))
    typer.echo(f"{model}: now serving {result.get('active')}")


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", envvar="EDGED_CONFIG", help="edged.toml to read; EDGED_* variables override it."),
) -> None:
    """Run the daemon in the foreground: load bundles, serve HTTP (and MQTT when configured)."""
    from edged.cli.serve import run_serve

    code = run_serve(config)
    if code:
        raise typer.Exit(code)


@models_app.command("list")
def models_list(url: str = URL_OPTION) -> None:
    """List every model version the daemon knows, with its state."""
    from edged.client import ClientError, V2Client

    try:
        rows = V2Client(url).post_json("/v2/repository/index", {})
    except ClientError as exc:
        _fail(str(exc))
    if not rows:
        typer.echo("no models")
    for row in rows:
        reason = f"  ({row['reason']})" if row.get("reason") else ""
        typer.echo(f"{row['name']:<24} {row['version']:<12} {row['state']}{reason}")


def _load_input(path: Path, model_inputs: list[dict]) -> dict[str, np.ndarray]:
    if not path.exists():
        _fail(f"{path}: no such file")
    if path.suffix == ".npy":
        if len(model_inputs) != 1:
            _fail(f"{path}: a .npy holds one tensor but the model has {len(model_inputs)} inputs; use .npz or .json")
        return {model_inputs[0]["name"]: np.load(path, allow_pickle=False)}
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k.removeprefix("input:"): data[k] for k in data.files if not k.startswith("output:")}
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, list):
            if len(model_inputs) != 1:
                _fail(f"{path}: a JSON list is one tensor but the model has {len(model_inputs)} inputs; use an object")
            data = {model_inputs[0]["name"]: data}
        return {k: np.asarray(v, dtype=np.float32) for k, v in data.items()}
    _fail(f"{path}: expected .npy, .npz or .json")
    return {}


@app.command()
def infer(
    model: str = typer.Argument(..., help="Model name, as in `edged models list`."),
    input: Path = typer.Option(..., "--input", "-i", help=".npy (one tensor), .npz or .json ({name: nested list})."),
    version: Optional[str] = typer.Option(None, "--version", "-v", help="Model version; default the newest ready."),
    url: str = URL_OPTION,
) -> None:
    """Send one inference request to a running daemon and print the outputs.
    Float input to an int8 model is quantized by the daemon."""
    from edged.client import ClientError, V2Client

    client = V2Client(url)
    try:
        meta = client.get_json(f"/v2/models/{model}" + (f"/versions/{version}" if version else ""))
        inputs = _load_input(input, meta.get("inputs", []))
        outputs = client.infer(model, inputs, version)
    except ClientError as exc:
        _fail(str(exc))
    labels = (meta.get("parameters") or {}).get("labels")
    for name, array in outputs.items():
        typer.echo(f"{name} {array.dtype} {list(array.shape)}")
        typer.echo(np.array2string(array, precision=4, threshold=50))
        if array.ndim == 2 and array.shape[1] > 1:
            top = array.argmax(axis=1)
            names = [labels[i] if labels and i < len(labels) else str(i) for i in top]
            typer.echo(f"top-1: {', '.join(names)}")


@profiles_app.command("list")
def profiles_list() -> None:
    """List every profile with its default output and precision."""
    from edged import profiles

    try:
        found = profiles.all_profiles()
    except EdgedError as exc:
        _fail(str(exc))
    for name, p in found.items():
        typer.echo(f"{name:<18} {p.output:<9} {p.precision:<5} {p.description}")


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="Profile name, e.g. rpi4.")) -> None:
    """Print one profile file."""
    from edged import profiles

    try:
        profile = profiles.get_profile(name)
    except EdgedError as exc:
        _fail(str(exc))
    typer.echo(f"# {profile.path}")
    typer.echo(profile.path.read_text(), nl=False)


def _cpu_flags() -> tuple[str, list[str]]:
    """("flags" on x86 / "Features" on Arm, the CPU's feature flags) from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[0].strip(), line.split(":", 1)[1].split()
    except OSError:
        pass
    return "", []


@app.command()
def doctor() -> None:
    """Show this machine's CPU, the runtimes that are importable, and the matching hw-profile."""
    from edged.runtimes import BACKENDS, runtime_versions

    kind, found = _cpu_flags()
    flags = set(found)
    arch = platform.machine()
    x86 = arch.lower() in ("x86_64", "amd64", "i686", "i386")
    interesting = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd", "asimddp", "fp16", "i8mm") if f in flags]
    typer.echo(f"edged {__version__}, Python {platform.python_version()}")
    if kind and (kind == "flags") != x86:
        # e.g. an arm64 userland under qemu-user on an x86 host: /proc/cpuinfo is the host's
        typer.echo(f"cpu: {arch} (emulated? /proc/cpuinfo describes a different architecture; CPU features unknown)")
    else:
        typer.echo(f"cpu: {arch}, {len(flags)} flags; relevant: {', '.join(interesting) or 'none'}")
    typer.echo("runtimes:")
    for name, ver in runtime_versions().items():
        if ver:
            typer.echo(f"  {name:<9} available  ({ver})")
        else:
            typer.echo(f"  {name:<9} missing    (pip install 'edged[{BACKENDS[name].extra}]')")
    try:
        from edged import profiles
    except ImportError:
        typer.echo("hw-profile: profile support not installed")
        return
    try:
        match = profiles.detect()
        typer.echo(f"hw-profile: {match}")
    except EdgedError as exc:
        typer.echo(f"hw-profile: none ({exc})")


from edged.cli.convert import convert as _convert  # noqa: E402  (heavy imports stay lazy inside)
app.command("convert")(_convert)

from edged.cli.bench import bench as _bench  # noqa: E402  (edged.bench is imported when it runs)
app.command("bench")(_bench)

from edged.cli.fleet import register as _register_fleet  # noqa: E402

_register_fleet(app, bundle_app)

if __name__ == "__main__":
    app()
