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
from typing import Any, Protocol

import numpy as np

from converters.data import Samples, load_samples, random_samples, samples_from_arrays
from converters.errors import AccuracyGateFailed, BadInput, ConversionError, ConverterUnavailable, OutputCollapsed, Skipped
from converters.metrics import Task
from converters.plan import Plan, make_converter, make_converters, plan_for
from converters.report import LATENCY_RUNS, build_report, failed_verdicts
from converters.source import Source, shapes_from_data
from edged.errors import EdgedError

DEFAULT_CALIB_SAMPLES = 300
FOLD_RUNTIMES = ("openvino", "tflite")  # they cannot take an If on an input (converters.fold); onnxruntime can
ALTERNATIVES = ("or convert for another profile (e.g. --profile generic-x86 keeps fp32 when int8 cannot pass), "
                "or serve the float model as it is with `edged bundle create`")


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
    from_files: bool = True  # False: random calibration data (no constant input is trusted to fold)


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
    return ConversionData(calib, validation, note, name, warnings, from_files=bool(options.calib or options.holdout))


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
    tune_budget_s: float = 0.0  # > 0: when int8 misses the gate, converters.tune tries others this long


@dataclass
class Result:
    bundle: Path
    report: dict[str, Any]
    plan: Plan


@dataclass
class Attempt:
    """One converted candidate in staging, with its validation report."""

    label: str  # e.g. "int8", "int8, 3 nodes in float", "fp32"
    staged: Path
    report: dict[str, Any]
    converter: Any = None  # what built it: its route's float twins (``float_variant``) come from here

    @property
    def passed(self) -> bool:
        return bool(self.report["gate"]["passed"]) and not self.report.get("collapsed")


@dataclass
class ConversionSession:
    """Everything one profile's conversion needs; ``attempt`` builds and
    validates one candidate. ``converters.tune`` uses it to try others."""

    source: Source
    profile: Any
    data: ConversionData
    target: Target
    plan: Plan
    staging: Path
    progress: Progress
    started: float = field(default_factory=time.perf_counter)
    attempts: list[Attempt] = field(default_factory=list)

    def model_path(self, runtime: str) -> Path:
        src = self.source
        return src.static_path if runtime == "tflite" and src.static_path else src.path

    def attempt(self, converter: Any, label: str) -> Attempt:
        """Convert with ``converter`` into a fresh staging dir and validate it."""
        from converters.base import BundleInfo
        from edged.bundle import open_bundle

        plan, profile, data = self.plan, self.profile, self.data
        info = BundleInfo(
            name=self.target.bundle_name, version=self.target.version, hw_profile=profile.name,
            labels=self.target.labels, validation=data.validation,
            extra_provenance={**plan.provenance, "calibration": data.calib_note, "source_opset": self.source.opset,
                              "tool": "edged convert",
                              **({"source_notes": self.source.notes} if self.source.notes else {})},
        )
        dest = self.staging / f"attempt-{len(self.attempts)}"
        began = time.perf_counter()
        with self.progress.stage(f"{profile.name}: converting to {converter.runtime} {label} "
                                 f"with {len(data.calibration)} calibration samples"):
            converter.convert(self.model_path(converter.runtime), profile, data.calibration, dest=dest, info=info)
        convert_s = time.perf_counter() - began
        self.progress.done(f"{profile.name}: converted to {converter.runtime} {label} ({convert_s:.1f}s)")
        with self.progress.stage(f"{profile.name}: validating on {len(data.validation)} {data.validation_name} "
                                 f"samples, {self.target.latency_runs} latency runs each"):
            report = build_report(dest, self.source, data.validation, data.validation_name,
                                  self.target.task, self.target.threshold, self.target.latency_runs)
        made = open_bundle(dest).manifest.provenance
        report.update(conversion_seconds=round(convert_s, 3), runtime=converter.runtime,
                      precision=made.get("precision", label), profile=profile.name)
        notes = list(plan.notes) + list(made.get("notes", []))
        for note in made.get("notes", []):
            self.progress.note(f"{profile.name}: {note}")
        if notes:
            report["notes"] = notes
        attempt = Attempt(label, dest, report, converter)
        self.attempts.append(attempt)
        return attempt


def convert_one(source: Source, profile: Any, data: ConversionData, target: Target,
                progress: Progress | None = None) -> Result:
    """Convert for one profile into ``target.out_dir / target.bundle_name``."""
    progress = progress or QuietProgress()
    if profile.precision == "auto":  # converters.precision: every candidate built and timed
        from converters.precision import plan_auto

        plan = plan_auto(profile, source)
    else:
        plan = plan_for(profile, source)
    target.out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.bundle_name}-staging-", dir=target.out_dir))
    try:
        if plan.runtime in FOLD_RUNTIMES and data.from_files:  # a constant input that picks an If branch
            from converters.fold import fold_for_target

            source, data, note = fold_for_target(source, data, staging)
            if note:
                plan.notes.append(note)
                plan.provenance["folded_inputs"] = note
        for note in plan.notes:
            progress.note(f"{profile.name}: {note}")
        session = ConversionSession(source, profile, data, target, plan, staging, progress)
        return _convert(session, source, profile, target, plan, progress)
    except (AccuracyGateFailed, BadInput, Skipped, ConverterUnavailable):
        raise  # these name their own way out
    except Exception as exc:  # a converter or runtime failure: say what else the user can do
        text = str(exc) if isinstance(exc, EdgedError) else f"{type(exc).__name__}: {exc}"
        if "bundle create" in text or "--profile" in text:
            raise
        kind = type(exc) if isinstance(exc, ConversionError) else ConversionError
        raise kind(f"{profile.name}: {text.splitlines()[0][:400] if text else type(exc).__name__}; "
                   f"instead: {ALTERNATIVES.removeprefix('or ')}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert(session: ConversionSession, source: Source, profile: Any, target: Target, plan: Plan,
             progress: Progress) -> Result:
    if plan.precision == "auto":
        from converters.precision import choose

        chosen = choose(session, make_converter(plan, profile, source))
    else:
        chosen = _attempt_routes(session, make_converters(plan, profile, source), plan.precision)
        if not chosen.passed and target.tune_budget_s > 0:
            from converters.tune import tune

            first = chosen
            chosen = tune(session, first) or first
            for key in ("route", "routes_tried"):  # a fallback comes from the same route
                if key in first.report:
                    chosen.report.setdefault(key, first.report[key])
        if chosen.passed:  # latency against fp32 on the same runtime, whatever the precision
            from converters.precision import compare_with_fp32

            compare_with_fp32(session, chosen)
    _gate(chosen.report, profile.name)
    verdicts = "; ".join(v["text"] for v in chosen.report["gate"]["verdicts"])
    progress.done(f"{profile.name}: validated ({verdicts})")
    bundle = _write_final(chosen.staged, target, chosen.report)
    progress.done(f"{profile.name}: wrote {bundle}")
    return Result(bundle, chosen.report, plan)


def _attempt_routes(session: ConversionSession, converters: list[Any], label: str) -> Attempt:
    """Try each route in turn until one passes the gate; the report names the
    route used and why the others failed. A route's ConversionError moves on
    to the next one; the last route's error ends the conversion."""
    from converters.errors import ConversionError

    tried: list[dict[str, str]] = []
    best: Attempt | None = None
    best_route = ""
    for i, converter in enumerate(converters):
        try:
            attempt = session.attempt(converter, label)
        except ConversionError as exc:
            tried.append({"route": converter.name, "outcome": f"failed: {exc}"})
            if i == len(converters) - 1 and best is None:
                if len(tried) > 1:
                    raise type(exc)("; ".join(f"{t['route']}: {t['outcome']}" for t in tried)) from None
                raise
            session.progress.note(f"{session.profile.name}: route {converter.name} failed; trying the next one")
            continue
        missed = [v["text"] for v in attempt.report["gate"]["verdicts"] if not v["passed"]]
        missed += attempt.report.get("collapsed", [])
        tried.append({"route": converter.name,
                      "outcome": "passed the gate" if attempt.passed else "missed the gate: " + "; ".join(missed)})
        if best is None or (attempt.passed and not best.passed):
            best, best_route = attempt, converter.name
        if attempt.passed:
            break
    if best is None:  # unreachable: the loop raised or kept an attempt
        raise ConversionError("no converter route ran")
    best.report["route"] = best_route
    if len(converters) > 1:
        best.report["routes_tried"] = tried
    return best


def _gate(report: dict[str, Any], profile_name: str) -> None:
    if report.get("collapsed"):
        raise OutputCollapsed(
            f"{profile_name}: the converted model's output collapsed ({'; '.join(report['collapsed'])}); "
            f"no bundle written. Try better calibration data, {ALTERNATIVES}", report)
    failed = failed_verdicts(report)
    if failed:
        hint = ("--max-accuracy-drop" if report["gate"]["metric"] == "top1" else "--gate-threshold") + \
               " (or a --task that fits the outputs)"
        raise AccuracyGateFailed(f"{profile_name}: the gate failed: {'; '.join(failed)}; no bundle written. "
                                 f"Adjust with {hint}, {ALTERNATIVES}", report)


def _write_final(staged: Path, target: Target, report: dict[str, Any]) -> Path:
    from edged.bundle import open_bundle, write_bundle

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
