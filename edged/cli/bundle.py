"""``edged bundle``: create, inspect, verify (and, from ``edged.cli.fleet``, sign and pack) bundles."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from edged.cli.common import fail

from edged.errors import EdgedError

if TYPE_CHECKING:
    from converters.wrap import WrapResult

bundle_app = typer.Typer(help="Create, inspect and verify model bundles (directories or .tar.gz).", no_args_is_help=True)


_fail = fail


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


@bundle_app.command("create")
def bundle_create(
    model: Path = typer.Argument(..., help="Model file: .onnx, .tflite, or OpenVINO .xml (its .bin beside it)."),
    out: Path = typer.Option(Path("bundles"), "--out", "-o", help="Directory the bundle is written into, as OUT/NAME."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name (default: the file stem)."),
    version: str = typer.Option("1.0.0", "--version", help="Bundle version (semver)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Text file with one class label per line."),
    hw_profile: Optional[str] = typer.Option(
        None, "--hw-profile", help="Profile to record (default: this machine's, see `edged doctor`)."),
    layout: Optional[list[str]] = typer.Option(
        None, "--layout", metavar="NAME=LAYOUT",
        help="Layout of a tensor, e.g. input=NCHW; repeatable (default: NCHW or NHWC for 4-D inputs)."),
    samples: Optional[Path] = typer.Option(
        None, "--samples",
        help=".npz keyed by input name (x for a single input): rank r arrays hold samples along dim 0, "
        "rank r+1 along a new axis. Default: generated inputs."),
    input_shape: Optional[list[str]] = typer.Option(
        None, "--input-shape", metavar="NAME=DIMS",
        help="Shape of generated inputs, e.g. x=1,3,48,320; repeatable (dynamic dims default to 1)."),
) -> None:
    """Wrap a model as it is (no conversion) into a bundle the daemon serves.

    Takes an fp32, fp16 or already quantized ONNX model (com.microsoft operators
    too), any .tflite, or an OpenVINO IR. Tensor specs come from the model;
    samples.npz holds the sample inputs and this model's outputs on them. Needs
    the model's runtime: pip install 'edged\\[onnx]', 'edged\\[tflite]' or
    'edged\\[openvino]'.
    """
    from rich.console import Console

    from converters.wrap import WrapOptions, parse_input_shapes, parse_layouts, wrap_model

    err = Console(stderr=True, soft_wrap=True)
    try:
        options = WrapOptions(
            name=name, version=version, labels=labels, hw_profile=hw_profile, out=out, samples=samples,
            layouts=parse_layouts(layout or []), input_shapes=parse_input_shapes(input_shape or []),
        )
        with err.status(f"wrapping {model.name}..."):
            result = wrap_model(model, options)
    except EdgedError as exc:
        _fail(str(exc), 2)
    except OSError as exc:
        _fail(f"{exc.filename or model}: {exc.strerror or exc}", 2)
    except Exception as exc:  # never a traceback; the type says where to look
        _fail(f"bundle create failed unexpectedly: {type(exc).__name__}: {exc}", 1)
    _print_created(result)


def _print_created(result: "WrapResult") -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console, err = Console(), Console(stderr=True, soft_wrap=True)
    m = result.bundle.manifest
    for note in result.notes:
        err.print(f"[yellow]note[/]: {escape(note)}", highlight=False)
    console.print(
        f"[green]✓[/] wrote {escape(str(result.bundle.root))}: {escape(m.name)} {m.version}, "
        f"runtime {m.runtime} ({escape(result.library)}), precision {result.precision} (as is), "
        f"profile {m.hw_profile}", highlight=False)
    console.print(f"  samples: {escape(result.samples_note)}", highlight=False)
    table = Table(title=f"{m.name}: tensors")
    for column in ("", "name", "dtype", "shape", "layout", "quantization"):
        table.add_column(column)
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for spec in specs:
            q = spec.quantization
            table.add_row(kind, escape(spec.name), spec.dtype, escape(str(list(spec.shape))), spec.layout,
                          f"scale {q.scale:.4g}, zero {q.zero_point}" if q else "")
    console.print(table)
