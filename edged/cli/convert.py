"""``edged convert``: parse options, run ``converters.pipeline``, print.

Exit codes: 0 ok (with --all-profiles, skipped profiles are reported, not
errors), 2 bad input (model, data, profile, options), 3 gate failed, 4 an
output collapsed. Heavy libraries are imported lazily so ``edged --help``
stays fast.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from converters.errors import EXIT_ACCURACY, EXIT_BAD_INPUT, EXIT_COLLAPSED
from converters.metrics import TASKS
from converters.pipeline import DEFAULT_CALIB_SAMPLES
from converters.report import LATENCY_RUNS

TASK_NAMES = [t for t in TASKS if t != "auto"]
PRECISION_NAMES = ("int8", "fp16", "fp32", "auto")
DEFAULT_TUNE_BUDGET_S = 300


class ConsoleProgress:
    """Stages as rich spinners with the elapsed time, then a check mark."""

    def __init__(self, console: Any) -> None:
        self.console = console

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        """A spinner with the stage's elapsed time (the libraries give no finer progress)."""
        from rich.markup import escape
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if not self.console.is_terminal:  # a pipe or a log: only the done lines
            yield
            return
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            bar.add_task(f"{escape(text)}...", total=None)
            yield

    def done(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(f"[green]✓[/] {escape(text)}", highlight=False)

    def note(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]note[/]: {escape(text)}", highlight=False)


def convert(
    source: Path = typer.Argument(
        ..., help="float32 ONNX model, Keras model (.keras/.h5), TF SavedModel directory or "
        "PyTorch torch.export archive (.pt2). A ready .tflite, OpenVINO .xml or quantized "
        ".onnx is served as it is with `edged bundle create`."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Hardware profile, e.g. rpi4 (edged profiles list)."),
    all_profiles: bool = typer.Option(False, "--all-profiles", help="One bundle per profile, named NAME-PROFILE."),
    out: Path = typer.Option(Path("bundles"), "--out", "-o", help="Directory the bundles are written into."),
    calib: Optional[str] = typer.Option(
        None, "--calib",
        help="Calibration data: .npz keyed by input name (x for one input; y for labels), .npy, a "
        "directory of images (needs Pillow) or module:function. Default: --holdout, else random 0..1."),
    calib_samples: int = typer.Option(DEFAULT_CALIB_SAMPLES, "--calib-samples", min=1,
                                      help="Use the first N calibration samples."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Held-out data for validation, same formats. Default: the calibration data."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Integer class labels (.npy) of the held-out set; a y key in the .npz works too."),
    task: Optional[str] = typer.Option(
        None, "--task", help=f"What the outputs are: {', '.join(TASK_NAMES)}. Sets the gate metric and "
        "threshold. Default: classify with labels, else cosine >= 0.97 on every output."),
    gate_threshold: Optional[float] = typer.Option(
        None, "--gate-threshold", help="Override the task's threshold: minimum cosine, minimum SQNR in dB "
        "(regress), or maximum top-1 drop in points (classify)."),
    max_accuracy_drop: Optional[float] = typer.Option(
        None, "--max-accuracy-drop", help="Classifiers: points of accuracy (top-1 agreement without labels) "
        "the conversion may lose (implies --task classify). Default 1."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name. Default: the source file stem."),
    version: str = typer.Option("1.0.0", "--version", help="Bundle version (semver)."),
    input_shape: list[str] = typer.Option(
        [], "--input-shape", help="Fix dynamic dims: NAME=1,3,48,320 (repeat per input; 1,3,48,320 for a "
        "single input). Default: the shape of the calibration data."),
    latency_runs: int = typer.Option(LATENCY_RUNS, "--latency-runs", min=1, help="Batch-1 runs per model for the latency figures."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="int8, fp16, fp32 or auto (overrides the profile's). auto builds int8, int8 with "
        "float layers, fp16 and fp32, times them on the target runtime and keeps the fastest that passes the gate."),
    tune_budget_s: int = typer.Option(
        DEFAULT_TUNE_BUDGET_S, "--tune-budget-s", min=0,
        help="Seconds to spend when int8 misses the gate: other calibration settings, then the most sensitive "
        "layers kept in float; when nothing passes, fp16 or fp32 on the same runtime. 0: no tuning."),
) -> None:
    """Convert a float32 model into a quantized, validated bundle per hardware profile.

    ONNX sources become ONNX int8 QDQ, OpenVINO IR or TFLite int8 (MLPs directly, other graphs
    through onnx2torch and litert-torch: pip install 'edged\\[convert-torch]'). Keras/SavedModel
    sources become full-integer TFLite int8 (pip install 'edged\\[convert-tf]'), PyTorch .pt2
    sources int8 TFLite with litert-torch. Every output is checked against the source model
    (cosine, SQNR, relative error; top-1 for classifiers); a bundle that misses the gate or whose
    output collapsed is not written.
    """
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, soft_wrap=True)  # errors stay on one line, greppable
    console = Console()

    def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
        err.print(f"[red]error[/]: {escape(message)}", highlight=False)
        raise typer.Exit(code)

    from converters.errors import AccuracyGateFailed, OutputCollapsed, Skipped, UnsupportedOp
    from converters.metrics import pick_task
    from converters.pipeline import DataOptions, Target, convert_one, prepare_data
    from converters.report import report_tables
    from converters.source import inspect_source
    from edged.errors import EdgedError
    from edged.profiles import ProfileError, all_profiles as load_all, get_profile

    if bool(profile) == bool(all_profiles):
        fail("give exactly one of --profile NAME or --all-profiles; known profiles: " + ", ".join(load_all()))
    if task is not None and task not in TASK_NAMES:
        fail(f"--task {task}: unknown task; choose one of {', '.join(TASK_NAMES)}")
    if max_accuracy_drop is not None and gate_threshold is not None:
        fail("give --max-accuracy-drop or --gate-threshold, not both")
    if precision is not None and precision not in PRECISION_NAMES:
        fail(f"--precision {precision}: unknown precision; choose one of {', '.join(PRECISION_NAMES)}")
    try:
        profiles = list(load_all().values()) if all_profiles else [get_profile(profile or "")]
    except ProfileError as exc:
        fail(str(exc))
    if precision is not None:  # --precision overrides every profile's
        import dataclasses

        profiles = [dataclasses.replace(p, precision=precision) for p in profiles]
    base_name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", source.stem)
    progress = ConsoleProgress(err)
    work = Path(tempfile.mkdtemp(prefix="edged-convert-"))
    try:
        try:
            with progress.stage("reading the source model"):
                src = inspect_source(source, input_shape, work)
            progress.done(f"source {source.name}: {src.describe()}")
            with progress.stage("loading calibration data"):
                data = prepare_data(src, DataOptions(calib, holdout, labels, calib_samples), work)
        except EdgedError as exc:
            fail(str(exc))
        for warning in data.warnings:
            err.print(f"[yellow]warning[/]: {escape(warning)}", highlight=False)
        for note in src.notes:
            progress.note(note)
        # --max-accuracy-drop without --task says the outputs are class scores.
        chosen = pick_task(task, data.validation.labels is not None or max_accuracy_drop is not None)
        threshold = max_accuracy_drop if max_accuracy_drop is not None else gate_threshold
        if chosen.metric != "top1" and max_accuracy_drop is not None:
            fail(f"--max-accuracy-drop applies to classifiers; task {chosen.name} gates on {chosen.metric}: "
                 "use --gate-threshold")
        progress.done(f"calibration: {len(data.calibration)} samples ({data.calib_note}); validation: "
                      f"{len(data.validation)} {data.validation_name} samples"
                      f"{', with labels' if data.validation.labels is not None else ''}; task {chosen.name}")
        results: list[tuple[str, str, str]] = []
        exit_code = 0
        for prof in profiles:
            bundle_name = f"{base_name}-{prof.name}" if all_profiles else base_name
            target = Target(out, bundle_name, version, chosen, threshold, latency_runs, tune_budget_s=tune_budget_s)
            try:
                result = convert_one(src, prof, data, target, progress)
            except (Skipped, UnsupportedOp) as exc:
                if not all_profiles and not isinstance(exc, Skipped):
                    fail(str(exc))
                err.print(f"[yellow]skipped[/] {prof.name}: {escape(str(exc))}", highlight=False)
                results.append((prof.name, "skipped", str(exc)))
                continue
            except AccuracyGateFailed as exc:
                for table in report_tables(exc.report, f"{bundle_name}: validation report (FAILED)"):
                    console.print(table)
                err.print(f"[red]error[/]: {escape(str(exc))}", highlight=False)
                results.append((prof.name, "failed", str(exc)))
                exit_code = max(exit_code, EXIT_COLLAPSED if isinstance(exc, OutputCollapsed) else EXIT_ACCURACY)
                continue
            except Exception as exc:  # EdgedError, or a library failing in a way no check foresaw
                message = str(exc) if isinstance(exc, EdgedError) else \
                    f"{prof.name}: conversion failed unexpectedly: {type(exc).__name__}: {exc}"
                if not all_profiles:
                    fail(message)
                err.print(f"[red]failed[/] {prof.name}: {escape(message)}", highlight=False)
                results.append((prof.name, "failed", message))
                exit_code = max(exit_code, EXIT_BAD_INPUT)
                continue
            for table in report_tables(result.report, f"{bundle_name}: validation report"):
                console.print(table)
            notes = "; ".join(result.plan.notes)
            results.append((prof.name, "written", f"{result.bundle}" + (f" ({notes})" if notes else "")))
        if all_profiles:
            _print_summary(console, results)
        if exit_code:
            raise typer.Exit(exit_code)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_summary(console: Any, results: list[tuple[str, str, str]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    summary = Table(title="edged convert --all-profiles")
    for col in ("profile", "status", "bundle / reason"):
        summary.add_column(col)
    for row in results:
        summary.add_row(*(escape(c) for c in row))
    console.print(summary)
