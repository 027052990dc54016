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
from edged.errors import EdgedError
from edged.tensors import TensorSpec

SAMPLE_COUNT = 8


class ConverterUnavailable(EdgedError):
    """The library a converter needs is not installed."""

    code = "converter_unavailable"


class ConversionError(EdgedError):
    """The source model cannot be converted (not a model, unsupported, failed)."""

    code = "conversion_failed"


class UnsupportedOp(ConversionError):
    """The source model uses an operator the converter does not handle."""

    code = "unsupported_op"


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
        calibration: np.ndarray,
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


def onnx_reference(source: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of the float source model, by onnxruntime."""
    ort = require("onnxruntime", "convert-onnx", "running the fp32 source model")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(source), sess_options=so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {name: x.astype(np.float32)})))


def profile_name(info: BundleInfo, profile: Any) -> str:
    if info.hw_profile:
        return info.hw_profile
    return getattr(profile, "name", None) or "generic"


def profile_option(profile: Any, runtime: str, key: str, default: Any) -> Any:
    if profile is None:
        return default
    return profile.runtime_options(runtime).get(key, default)


def _top1(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(len(a), -1).argmax(axis=1)


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
    calibration: np.ndarray,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    source: Path,
    provenance: dict[str, Any],
) -> Bundle:
    """Write the bundle: samples from held-out data with the SOURCE model's
    outputs, a tolerance that the converted model meets on them, validation
    (fp32 vs converted accuracy and top-1 agreement) and provenance.

    The model is first written to a scratch bundle and run through
    ``edged.model.LoadedModel`` exactly as the daemon would, then the final
    bundle is written atomically to ``dest``.
    """
    from edged.model import LoadedModel
    from edged.runtimes import RuntimeOptions

    held_out = info.validation_x if info.validation_x is not None else calibration
    held_out = np.asarray(held_out, dtype=np.float32)
    sample_x = held_out[:SAMPLE_COUNT]
    in_name = inputs[0].name
    sample_ref = reference(sample_x)
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
        trial = write_bundle(scratch / "bundle", manifest, files, {in_name: sample_x}, sample_ref)
        model = LoadedModel.load(open_bundle(trial.root), RuntimeOptions(), warmup=0)
        try:
            got = model.infer({in_name: sample_x})
            worst = max(
                float(np.max(np.abs(got[k].astype(np.float64) - v.astype(np.float64))))
                for k, v in sample_ref.items()
            )
            validation: dict[str, Any] = {"samples": int(len(held_out)), "max_abs_error_samples": worst}
            ref_all = reference(held_out)
            conv_all = model.infer({in_name: held_out})
            first = outputs[0].name
            ref_top, conv_top = _top1(ref_all[first]), _top1(conv_all[first])
            validation["top1_agreement"] = float(np.mean(ref_top == conv_top))
            validation["max_abs_error"] = float(
                np.max(np.abs(ref_all[first].astype(np.float64) - conv_all[first].astype(np.float64)))
            )
            if info.validation_y is not None:
                y = np.asarray(info.validation_y).reshape(-1)
                validation["accuracy_fp32"] = float(np.mean(ref_top == y))
                validation["accuracy_converted"] = float(np.mean(conv_top == y))
        finally:
            model.unload()
        # Self-test passes with a 2x margin over the error seen on the samples.
        manifest.tolerance = {"atol": float(max(2.0 * worst, 1e-3)), "rtol": 0.0}
        manifest.validation = validation
        bundle = write_bundle(dest, manifest, files, {in_name: sample_x}, sample_ref)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return bundle
