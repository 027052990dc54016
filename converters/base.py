"""What every converter shares: the ``Converter`` protocol, errors, and the
bundle-finishing step (samples, tolerance, validation, provenance).

A converter takes a float32 ONNX model and writes a bundle with
``edged.bundle.write_bundle``. Converter libraries are imported lazily; a
missing one raises ``ConverterUnavailable`` naming the pip extra to install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from edged.bundle import Bundle, Manifest, open_bundle, sha256_file, write_bundle
from converters.data import ModelInput, Samples, as_samples, rename_feed
from converters.errors import ConversionError, ConverterUnavailable, UnsupportedOp
from edged.tensors import TensorSpec

SAMPLE_COUNT = 8
# Self-test floor of int8 bundles, as a fraction of each output's largest |value| on the samples.
INT8_PEAK_FRACTION = 0.2
Feed = dict[str, np.ndarray]


@dataclass
class BundleInfo:
    """Bundle metadata a converter cannot know from the model itself."""

    name: str
    version: str = "1.0.0"
    labels: list[str] | None = None
    hw_profile: str | None = None  # defaults to the profile's name, else "generic"
    # Held-out data for the manifest's validation block: x (float32) and
    # optional integer labels y. samples.npz takes its inputs from here too.
    validation_x: np.ndarray | None = None
    validation_y: np.ndarray | None = None
    extra_provenance: dict[str, Any] = field(default_factory=dict)
    validation: Samples | None = None  # takes the place of validation_x / validation_y

    def held_out(self, inputs: list[TensorSpec]) -> Samples | None:
        if self.validation is not None:
            return self.validation
        if self.validation_x is None:
            return None
        first = ModelInput(inputs[0].name, tuple(inputs[0].shape), "float32")
        samples = as_samples(np.asarray(self.validation_x, dtype=np.float32), [first])
        samples.labels = None if self.validation_y is None else np.asarray(self.validation_y).reshape(-1)
        return samples


class Converter(Protocol):
    """One conversion target. ``profile`` is an ``edged.profiles.Profile`` or
    None; converters read its precision and runtime options when given."""

    name: str
    runtime: str
    extra: str  # pip extra that installs what it needs

    def convert(
        self,
        source: Path,
        profile: Any,
        calibration: Samples | np.ndarray,  # Samples, or an [N, ...] array for one input
        *,
        dest: Path,
        info: BundleInfo,
    ) -> Bundle: ...


def require(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise ConverterUnavailable naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConverterUnavailable(
            f"{what} needs {module.split('.')[0]} ({exc}): pip install 'edged[{extra}]'"
        ) from None


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_onnx(source: Path, extra: str) -> Any:
    """Read and check an ONNX file; ConversionError when it is not one."""
    onnx = require("onnx", extra, "reading ONNX models")
    source = Path(source)
    if not source.is_file():
        raise ConversionError(f"{source}: no such model file")
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ConversionError(f"{source.name}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise ConversionError(f"{source.name}: not an ONNX model (no graph nodes, inputs or outputs)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ConversionError(f"{source.name}: invalid ONNX model: {exc}") from None
    return model


def onnx_io_names(model: Any) -> tuple[list[str], list[str]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    return inputs, [o.name for o in model.graph.output]


def onnx_reference(source: Path) -> Callable[[Feed], Feed]:
    """One call of the float source model by onnxruntime: feed -> outputs by name."""
    from converters.source import source_session

    session = source_session(Path(source))
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(names, feed)))


def onnx_model_inputs(model: Any) -> list[ModelInput]:
    """The graph inputs (not initializers) of an ONNX model."""
    from converters.source import _model_input

    inits = {i.name for i in model.graph.initializer}
    return [_model_input(vi) for vi in model.graph.input if vi.name not in inits]


def profile_name(info: BundleInfo, profile: Any) -> str:
    if info.hw_profile:
        return info.hw_profile
    import platform

    return getattr(profile, "name", None) or ("generic-arm64" if platform.machine() in ("aarch64", "arm64")
                                              else "generic-x86")


def profile_option(profile: Any, runtime: str, key: str, default: Any) -> Any:
    if profile is None:
        return default
    return profile.runtime_options(runtime).get(key, default)


def finish_bundle(
    *,
    dest: Path,
    info: BundleInfo,
    profile: Any,
    runtime: str,
    model_file: str,
    files: dict[str, Path],
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    calibration: Samples,
    reference: Callable[[Feed], Feed],
    source: Path,
    provenance: dict[str, Any],
) -> Bundle:
    """Write the bundle: samples from held-out data with the SOURCE model's
    outputs (``reference`` runs one call of it), a tolerance that the converted
    model meets on them, and provenance.

    The model is first written to a scratch bundle and run through
    ``edged.model.LoadedModel`` exactly as the daemon would, then the final
    bundle is written atomically to ``dest``. The full validation against
    the source is ``converters.report``'s job.
    """
    from edged.model import LoadedModel
    from edged.runtimes import RuntimeOptions

    held_out = info.held_out(inputs)
    if held_out is None:
        held_out = calibration
    sample_in = _daemon_samples(held_out.head(SAMPLE_COUNT))
    refs = [_rename(reference(feed), outputs) for feed in sample_in]
    if sample_in.batchable and all(np.ndim(v) and np.shape(v)[0] == 1 for v in refs[0].values()):
        sample_ref = {k: np.concatenate([r[k] for r in refs]) for k in refs[0]}
        feed = sample_in.stacked()
    else:
        sample_ref, feed = refs[0], sample_in.sample(0)
    feed = rename_feed(feed, [s.name for s in inputs])
    manifest = Manifest(
        name=info.name, version=info.version, runtime=runtime, model_file=model_file,
        inputs=inputs, outputs=outputs, hw_profile=profile_name(info, profile),
        labels=info.labels,
        provenance={
            **provenance,
            "source": Path(source).name,
            "source_sha256": sha256_file(Path(source)),
            "calibration_samples": int(len(calibration)),
            **info.extra_provenance,
        },
    )
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{info.name}-check-", dir=Path(dest).parent))
    try:
        trial = write_bundle(scratch / "bundle", manifest, files, feed, sample_ref)
        model = LoadedModel.load(open_bundle(trial.root), RuntimeOptions(), warmup=0)
        try:
            got = model.infer(feed)
            validation = _validation(model, held_out, reference, inputs, outputs)
        finally:
            model.unload()
        worst = max(
            (float(np.max(np.abs(got[k].astype(np.float64) - v.astype(np.float64)), initial=0.0))
             for k, v in sample_ref.items() if k in got),
            default=0.0,
        )
        if not np.isfinite(worst):
            raise ConversionError(f"{info.name}: the converted model gives NaN/Inf on the sample inputs")
        # Self-test passes with a 2x margin over the error seen on the samples.
        manifest.tolerance = {"atol": float(max(2.0 * worst, 1e-3)), "rtol": 0.0}
        if provenance.get("precision") == "int8":
            # Another CPU's int8 kernels accumulate and round differently (x86 without VNNI
            # saturates u8s8 pairs, arm64 and VNNI do not): the digits bundle whose outputs
            # were 0.12 off here was 0.75 off in an emulated guest. A floor relative to
            # each output's peak keeps the self-test for what it is for (a runtime that
            # computes nonsense) without refusing a correct bundle on the fleet.
            manifest.tolerance["peak_fraction"] = INT8_PEAK_FRACTION
        manifest.validation = {**validation, "max_abs_error_samples": worst}
        bundle = write_bundle(dest, manifest, files, feed, sample_ref)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return bundle


def _validation(model: Any, held_out: Samples, reference: Callable[[Feed], Feed],
                inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, Any]:
    """The converted model against the source on the held-out samples, one
    call each: top-1 agreement (and accuracy with labels) of the first output,
    cosine per output."""
    from converters.metrics import compare_output
    from converters.source import run_per_sample

    names = [s.name for s in inputs]
    ref = run_per_sample(lambda feed: _rename(reference(feed), outputs), held_out)
    got = run_per_sample(lambda feed: model.infer(rename_feed(feed, names)), held_out)
    first = outputs[0].name
    head = compare_output(first, ref[first], got[first], classify=True, labels=held_out.labels)
    validation: dict[str, Any] = {
        "samples": int(len(held_out)),
        "top1_agreement": head.top1_agreement,
        "max_abs_error": head.max_abs_error,
        "cosine": {o.name: compare_output(o.name, ref[o.name], got[o.name], classify=False).cosine
                   for o in outputs if o.name in got},
    }
    if head.accuracy_source is not None:
        validation["accuracy_fp32"] = head.accuracy_source
        validation["accuracy_converted"] = head.accuracy_converted
    return validation


def _daemon_samples(samples: Samples) -> Samples:
    """What samples.npz holds: up to SAMPLE_COUNT samples as one batch when
    the inputs stack along dim 0, else the first call's inputs alone."""
    return samples if samples.batchable else samples.head(1)


def _rename(outputs: Feed, specs: list[TensorSpec]) -> Feed:
    """Source outputs under the converted model's names: by name, else by position."""
    names = [s.name for s in specs]
    if set(names) <= set(outputs):
        return {n: np.asarray(outputs[n]) for n in names}
    return {n: np.asarray(v) for n, v in zip(names, outputs.values())}
