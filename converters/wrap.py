"""``edged bundle create``: wrap a model file as it is into a bundle the daemon serves.

Nothing is converted. An ONNX model (fp32, fp16 or already quantized,
``com.microsoft`` operators included), a ``.tflite`` model or an OpenVINO IR
(``.xml`` with its ``.bin`` beside it) is copied into the bundle. Every tensor
spec comes from edged's own runtime reading the model. ``samples.npz`` holds
inputs (from a samples file, else generated to fit each input) and the outputs
this model gives on them through ``edged.model.LoadedModel``, as the daemon
runs it; the tolerance is tight because the reference is the model itself.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from converters.wrap_files import ModelFiles, model_files, model_precision
from converters.wrap_samples import (
    MAX_SAMPLES, WrapError, generate_samples, load_samples, parse_input_shapes, quoted, stack_samples, stackable,
)
from edged.bundle import NAME, SEMVER, Bundle, Manifest, open_bundle, sha256_file, write_bundle
from edged.tensors import NUMPY_TO_V2, TensorSpec

__all__ = ["WrapError", "WrapOptions", "WrapResult", "parse_input_shapes", "parse_layouts", "wrap_model"]

@dataclass
class WrapOptions:
    """What ``edged bundle create`` takes besides the model path."""

    name: str | None = None
    version: str = "1.0.0"
    labels: Path | None = None
    hw_profile: str | None = None
    layouts: dict[str, str] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # "" = the only input
    samples: Path | None = None
    out: Path = Path("bundles")


@dataclass
class WrapResult:
    """The written bundle and what the CLI prints about it."""

    bundle: Bundle
    library: str
    precision: str
    samples_note: str
    notes: list[str]


# ----------------------------------------------------------------- options


def parse_layouts(values: list[str]) -> dict[str, str]:
    """``name=NCHW`` (repeatable)."""
    layouts: dict[str, str] = {}
    for value in values:
        name, sep, layout = value.rpartition("=")
        layout = layout.strip().upper()
        if not sep or not name.strip() or not re.fullmatch(r"[A-Z]*", layout) or len(set(layout)) != len(layout):
            raise WrapError(f"--layout {value!r}: expected NAME=LETTERS with no letter twice, e.g. input=NCHW")
        layouts[name.strip()] = layout
    return layouts


def default_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem).lstrip("-_.")[:128]
    return name or "model"


def read_labels(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WrapError(f"--labels {path}: cannot read ({exc})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise WrapError(f"--labels {path}: the file has no labels (one per line)")
    return [line.strip() for line in lines]


def resolve_profile(name: str | None, runtime: str) -> tuple[str, list[str]]:
    """The hw_profile to record: the given one (validated), else this machine's
    detected profile, else generic-x86 / generic-arm64 by architecture."""
    from edged import profiles

    notes: list[str] = []
    if name:
        profile = profiles.get_profile(name)  # ProfileError names the known ones
    else:
        try:
            profile = profiles.get_profile(profiles.detect())
        except profiles.ProfileError:
            arch = platform.machine().lower()
            fallback = "generic-arm64" if arch in ("aarch64", "arm64") else "generic-x86"
            notes.append(f"no hw-profile matches this machine; recorded {fallback}")
            try:
                profile = profiles.get_profile(fallback)
            except profiles.ProfileError:
                return fallback, notes  # no profile files installed at all
    if runtime not in profile.preference:
        notes.append(f"profile {profile.name} does not list {runtime} among its runtimes ({', '.join(profile.preference)})")
    return profile.name, notes


# ------------------------------------------------------------------- model


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Hold back what C++ libraries print on fd 2 while models load and run
    (onnxruntime's error log, TFLite's INFO lines): a failure reaches the user
    as one error line that carries the library's message."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        saved = -1
    if saved < 0:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def read_specs(runtime: Any, files: ModelFiles) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Load the model once with edged's runtime and read its tensors."""
    from edged.runtimes import RuntimeOptions

    try:
        runtime.load(str(files.source), RuntimeOptions())
    except Exception as exc:  # each library raises its own error types
        raise WrapError(f"{files.source.name}: not a valid {files.runtime} model ({_first_line(exc)})") from None
    try:
        inputs, outputs = list(runtime.inputs), list(runtime.outputs)
    finally:
        runtime.unload()
    if not inputs or not outputs:
        raise WrapError(f"{files.source.name}: the model has no inputs or no outputs")
    for spec in inputs + outputs:
        if spec.dtype not in NUMPY_TO_V2:
            raise WrapError(f"tensor {spec.name}: dtype {spec.dtype} cannot be served over KServe V2")
    return inputs, outputs


def image_layout(spec: TensorSpec, runtime: str) -> str:
    """NCHW or NHWC for a 4-D input, from where a 1/3/4-channel dim sits."""
    if len(spec.shape) != 4:
        return ""
    chw, hwc = spec.shape[1] in (1, 3, 4), spec.shape[3] in (1, 3, 4)
    if chw != hwc:
        return "NCHW" if chw else "NHWC"
    return "NHWC" if runtime == "tflite" else "NCHW"


def apply_layouts(inputs: list[TensorSpec], outputs: list[TensorSpec], layouts: dict[str, str],
                  runtime: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    known = {s.name: s for s in inputs + outputs}
    for name, layout in layouts.items():
        if name not in known:
            raise WrapError(f"--layout {name}={layout}: the model has no tensor {name!r}; it has {quoted(known)}")
        if len(layout) != len(known[name].shape):
            raise WrapError(f"--layout {name}={layout}: {name} has rank {len(known[name].shape)} (shape {list(known[name].shape)})")
    return (
        [replace(s, layout=layouts.get(s.name, image_layout(s, runtime))) for s in inputs],
        [replace(s, layout=layouts.get(s.name, "")) for s in outputs],
    )


# -------------------------------------------------------------------- wrap


def run_reference(root: Path, manifest: Manifest, files: dict[str, Path], call: dict[str, np.ndarray],
                  count: int, samples: list[dict[str, np.ndarray]], hint: str,
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Write a scratch bundle under ``root``, load it with LoadedModel as the
    daemon does and run ``call`` (``count`` samples); a batch the model
    refuses falls back to the first sample. Returns (inputs, outputs, count)."""
    from edged.model import LoadedModel
    from edged.runtimes import RuntimeOptions

    trial = write_bundle(root / "bundle", manifest, files, {}, {})
    try:
        model = LoadedModel.load(open_bundle(trial.root), RuntimeOptions(), warmup=0)
    except Exception as exc:  # the libraries raise their own error types
        raise WrapError(f"the model does not load from the bundle: {_first_line(exc)}") from None
    try:
        try:
            return call, model.infer(call), count
        except Exception as exc:
            if count == 1:
                raise WrapError(f"the model failed on the sample inputs{hint}: {_first_line(exc)}") from None
        single = dict(samples[0])
        try:
            return single, model.infer(single), 1
        except Exception as exc:
            raise WrapError(f"the model failed on the sample inputs{hint}: {_first_line(exc)}") from None
    finally:
        model.unload()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_outputs(outputs: dict[str, np.ndarray], specs: list[TensorSpec]) -> None:
    for spec in specs:
        array = outputs.get(spec.name)
        if not isinstance(array, np.ndarray) or array.dtype.name not in NUMPY_TO_V2:
            what = type(array).__name__ if not isinstance(array, np.ndarray) else f"dtype {array.dtype}"
            raise WrapError(f"output {spec.name} is not a numeric tensor ({what}); edged serves tensors only")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise WrapError(f"output {spec.name} has NaN or Inf on the sample inputs; pass --samples with real inputs")


def tolerance(outputs: dict[str, np.ndarray], specs: list[TensorSpec]) -> dict[str, float]:
    """Tight: 1e-4 of the widest output range, at least one quantization step
    of a quantized output (kernels may round differently on another CPU)."""
    spread, step = 0.0, 0.0
    for spec in specs:
        array = outputs[spec.name].astype(np.float64)
        if array.size:
            spread = max(spread, float(array.max() - array.min()))
        if spec.quantization is not None:
            step = max(step, 1.0 if outputs[spec.name].dtype.kind in "iu" else spec.quantization.scale)
    return {"atol": float(max(1e-4 * spread, step, 1e-6)), "rtol": 1e-4}


def wrap_model(path: Path, options: WrapOptions) -> WrapResult:
    """Write ``options.out / name``: the model as is, its specs, samples and provenance."""
    from edged import __version__
    from edged.runtimes import create_runtime, runtime_versions

    files = model_files(path)
    name = options.name or default_name(files.source)
    if not NAME.match(name):
        raise WrapError(f"--name {name!r}: must match {NAME.pattern}")
    if not SEMVER.match(options.version):
        raise WrapError(f"--version {options.version!r} is not semver (MAJOR.MINOR.PATCH)")
    if options.samples and options.input_shapes:
        raise WrapError("--input-shape shapes generated samples; with --samples the shapes come from the file")
    labels = read_labels(options.labels) if options.labels else None
    hw_profile, notes = resolve_profile(options.hw_profile, files.runtime)
    runtime = create_runtime(files.runtime)  # RuntimeUnavailable names the pip extra
    library = runtime_versions().get(files.runtime) or files.runtime
    with quiet_native_stderr():
        inputs, outputs = apply_layouts(*read_specs(runtime, files), options.layouts, files.runtime)
    if options.samples:
        samples, samples_note = load_samples(options.samples, inputs)
        hint = f" from {Path(options.samples).name}"
    else:
        samples, samples_note = generate_samples(inputs, options.input_shapes)
        hinted = {inputs[0].name} if "" in options.input_shapes else set(options.input_shapes)
        dynamic = [s.name for s in inputs if -1 in s.shape[1:] and s.name not in hinted]
        if dynamic:
            notes.append(f"dynamic dims of {quoted(dynamic)} set to 1 in the generated samples; "
                         "pass --input-shape NAME=DIMS or --samples for realistic ones")
        hint = (" (generated; pass --samples with real inputs"
                + (f", or --input-shape for the dynamic dims of {quoted(dynamic)})" if dynamic else ")"))
    call, count = stack_samples(samples, inputs)
    precision = model_precision(files, inputs, outputs)
    if labels and not any(len(labels) in s.shape for s in outputs):
        notes.append(f"{len(labels)} labels but no output has a dim of that size")
    sources = {src.name: sha256_file(src) for src in files.files.values()}
    manifest = Manifest(
        name=name, version=options.version, runtime=files.runtime, model_file=files.model_file,
        inputs=inputs, outputs=outputs, hw_profile=hw_profile, labels=labels,
        provenance={
            "tool": "edged bundle create", "edged_version": __version__,
            "source": files.source.name, "source_sha256": sources[files.source.name],
            **({"source_files": sources} if len(sources) > 1 else {}),
            "runtime_library": library, "precision": precision,
            "conversion": "none: the model is served as is (precision as found in the file, best effort)",
        },
    )
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-create-", dir=out))
    try:
        with quiet_native_stderr():
            call, expected, used = run_reference(scratch, manifest, files.files, call, count, samples, hint)
        check_outputs(expected, outputs)
        samples_note += f"; samples.npz holds {used} sample{'s' * (used != 1)}"
        if used < count:
            samples_note += f" (the model refused a batch of {count})"
        elif len(samples) > 1 and not stackable(samples[0], inputs):
            samples_note += " (one call: the inputs do not stack along dim 0)"
        elif used < min(len(samples), MAX_SAMPLES):
            samples_note += " (inputs kept under 4 MiB)"
        manifest.provenance["samples"] = samples_note
        manifest.tolerance = tolerance(expected, outputs)
        manifest.validation = {"samples": used, "reference": "the model itself, wrapped as is"}
        bundle = write_bundle(out / name, manifest, files.files, call, expected)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return WrapResult(bundle=bundle, library=library, precision=precision, samples_note=samples_note, notes=notes)
