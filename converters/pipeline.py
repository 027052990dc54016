"""One conversion, start to end: plan, convert, validate, gate, write.

    source = inspect_source(path, [], workdir)      # converters.source
    data = prepare_data(source, DataOptions(...), workdir)
    result = convert_one(source, profile, data, Target(...), progress)

The bundle is built in a staging directory and moved into place only when the
gate passed and no output collapsed; otherwise nothing is written. Nothing
here prints: ``progress`` gets stage names, the CLI shows them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from converters.data import Samples, load_samples, random_samples, samples_from_arrays
from converters.errors import AccuracyGateFailed, BadInput, OutputCollapsed
from converters.metrics import Task
from converters.plan import Plan, make_converter, plan_for
from converters.report import LATENCY_RUNS, build_report, failed_verdicts
from converters.source import Source, shapes_from_data

DEFAULT_CALIB_SAMPLES = 300


class Progress(Protocol):
    def stage(self, text: str) -> Any: ...  # a context manager around one stage

    def done(self, text: str) -> None: ...

    def note(self, text: str) -> None: ...


class QuietProgress:
    """Progress that shows nothing (benchmarks, tests)."""

    def stage(self, text: str) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def done(self, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class DataOptions:
    calib: str | None = None
    holdout: str | None = None
    labels: Path | None = None
    calib_samples: int = DEFAULT_CALIB_SAMPLES


@dataclass
class ConversionData:
    calibration: Samples
    validation: Samples
    calib_note: str
    validation_name: str  # "holdout" or "calibration"
    warnings: list[str] = field(default_factory=list)


def prepare_data(source: Source, options: DataOptions, workdir: Path) -> ConversionData:
    """Calibration and validation samples, checked against the model's inputs.
    Dynamic dims of the source are fixed from the data when it is given."""
    holdout = load_samples(options.holdout, source.inputs, "holdout data") if options.holdout else None
    calib = load_samples(options.calib, source.inputs, "calibration data") if options.calib else None
    warnings = []
    if calib is not None:
        note = f"{options.calib}, first {min(options.calib_samples, len(calib))} samples"
    elif holdout is not None:
        calib, note = holdout, f"--holdout {options.holdout} (no --calib given)"
    else:
        calib = random_samples(source.inputs, options.calib_samples)
        note = "random uniform 0..1 (no --calib given; pass real data for a useful int8 model)"
        warnings.append("no --calib: calibrating on random uniform 0..1 data")
    shapes_from_data(source, holdout if holdout is not None else calib, workdir)
    if holdout is not None and source.notes:  # the calibration set must fit the shapes taken from the holdout
        samples_from_arrays(calib.arrays, source.inputs, "calibration data")
    calib = calib.head(options.calib_samples)
    validation, name = (holdout, "holdout") if holdout is not None else (calib, "calibration")
    if options.labels is not None:
        try:
            validation.labels = np.asarray(np.load(options.labels, allow_pickle=False)).reshape(-1)
        except (OSError, ValueError) as exc:
            raise BadInput(f"labels {options.labels}: cannot read ({exc})") from None
    if validation.labels is not None:
        labels = validation.labels
        if labels.dtype.kind not in "iu" or len(labels) != len(validation):
            raise BadInput(f"labels: expected {len(validation)} integer labels for the {name} set, "
                           f"got {len(labels)} {labels.dtype}")
    return ConversionData(calib, validation, note, name, warnings)


@dataclass
class Target:
    """Where and how one bundle is written, and what it must pass."""

    out_dir: Path
    bundle_name: str
    version: str
    task: Task
    threshold: float | None = None  # the task's default when None
    latency_runs: int = LATENCY_RUNS
    labels: list[str] | None = None


@dataclass
class Result:
    bundle: Path
    report: dict[str, Any]
    plan: Plan


def convert_one(source: Source, profile: Any, data: ConversionData, target: Target,
                progress: Progress | None = None) -> Result:
    """Convert for one profile into ``target.out_dir / target.bundle_name``."""
    from converters.base import BundleInfo
    from edged.bundle import open_bundle, write_bundle

    progress = progress or QuietProgress()
    plan = plan_for(profile, source)
    for note in plan.notes:
        progress.note(f"{profile.name}: {note}")
    converter = make_converter(plan, profile, source)
    target.out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.bundle_name}-staging-", dir=target.out_dir))
    try:
        info = BundleInfo(
            name=target.bundle_name, version=target.version, hw_profile=profile.name, labels=target.labels,
            validation=data.validation,
            extra_provenance={**plan.provenance, "calibration": data.calib_note, "source_opset": source.opset,
                              "tool": "edged convert", **({"source_notes": source.notes} if source.notes else {})},
        )
        began = time.perf_counter()
        with progress.stage(f"{profile.name}: quantizing to {plan.runtime} {plan.precision} "
                            f"with {len(data.calibration)} calibration samples"):
            model_path = source.static_path if plan.runtime == "tflite" and source.static_path else source.path
            converter.convert(model_path, profile, data.calibration, dest=staging / "bundle", info=info)
        convert_s = time.perf_counter() - began
        progress.done(f"{profile.name}: converted to {plan.runtime} {plan.precision} ({convert_s:.1f}s)")
        with progress.stage(f"{profile.name}: validating on {len(data.validation)} {data.validation_name} "
                            f"samples, {target.latency_runs} latency runs each"):
            report = build_report(staging / "bundle", source, data.validation, data.validation_name,
                                  target.task, target.threshold, target.latency_runs)
        made = open_bundle(staging / "bundle").manifest.provenance
        report.update(conversion_seconds=round(convert_s, 3), runtime=plan.runtime,
                      precision=made.get("precision", plan.precision), profile=profile.name)
        plan.notes.extend(made.get("notes", []))
        for note in made.get("notes", []):
            progress.note(f"{profile.name}: {note}")
        if plan.notes:
            report["notes"] = plan.notes
        _gate(report, profile.name)
        progress.done(f"{profile.name}: validated (" + "; ".join(v["text"] for v in report["gate"]["verdicts"]) + ")")
        bundle = _write_final(staging / "bundle", target, report, open_bundle, write_bundle)
        progress.done(f"{profile.name}: wrote {bundle}")
        return Result(bundle, report, plan)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gate(report: dict[str, Any], profile_name: str) -> None:
    if report.get("collapsed"):
        raise OutputCollapsed(
            f"{profile_name}: the converted model's output collapsed ({'; '.join(report['collapsed'])}); "
            "no bundle written. Try another profile or precision, or better calibration data", report)
    failed = failed_verdicts(report)
    if failed:
        hint = ("--max-accuracy-drop" if report["gate"]["metric"] == "top1" else "--gate-threshold") + \
               " (or a --task that fits the outputs)"
        raise AccuracyGateFailed(f"{profile_name}: the gate failed: {'; '.join(failed)}; no bundle written "
                                 f"(adjust with {hint})", report)


def _write_final(staged: Path, target: Target, report: dict[str, Any],
                 open_bundle: Callable[..., Any], write_bundle: Callable[..., Any]) -> Path:
    trial = open_bundle(staged)
    manifest = trial.manifest
    manifest.validation = {**manifest.validation, **report}
    files = {rel: trial.root / rel for rel in manifest.files if rel not in ("samples.npz", "report.json")}
    samples_in, samples_out = trial.load_samples()
    bundle = write_bundle(
        target.out_dir / target.bundle_name, manifest, files, samples_in, samples_out,
        extra_files={"report.json": (json.dumps(report, indent=2) + "\n").encode()},
    )
    return bundle.root
