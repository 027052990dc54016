"""``edged convert``: a float32 ONNX model -> a quantized, validated bundle per
hardware profile (see docs/convert.md).

    edged convert model.onnx --profile rpi4 --calib calib.npz --holdout test.npz -o bundles/
    edged convert model.onnx --all-profiles --calib calib.npz -o bundles/

The profile picks the target runtime (``runtime.output``), the precision and
runtime options. Each conversion is validated against the source model (top-1
agreement, accuracy with labels, output error, latency, size); the report goes
into the bundle (``manifest.validation`` and ``report.json``). A conversion that
loses more than ``--max-accuracy-drop`` points writes no bundle.

Exit codes: 0 ok (with --all-profiles: skipped profiles are reported, not
errors), 2 bad input (model, data, profile, options), 3 accuracy gate failed.
Heavy libraries are imported lazily so ``edged --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from edged.errors import EdgedError

DEFAULT_CALIB_SAMPLES = 300
LATENCY_RUNS = 200
LATENCY_WARMUP = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp")
STATIC_SHAPE_RUNTIMES = ("tflite", "openvino")
EXIT_BAD_INPUT = 2
EXIT_ACCURACY = 3


class BadInput(EdgedError):
    """The model, data or options given to ``edged convert`` are unusable."""

    code = "bad_input"


class AccuracyGateFailed(EdgedError):
    """The converted model lost more accuracy than --max-accuracy-drop allows."""

    code = "accuracy_drop"

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class Skipped(EdgedError):
    """This profile's target cannot be converted or run on this machine."""

    code = "skipped"


@dataclass
class ModelInput:
    name: str
    shape: tuple[int, ...]  # -1 for symbolic / unknown dims
    dtype: str

    @property
    def dynamic_non_batch(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if i > 0 and d < 0]


@dataclass
class Source:
    path: Path  # the model the converters read (a fixed-shape copy with --input-shape)
    original: Path
    input: ModelInput
    opset: int
    kind: str = "onnx"  # "tf": Keras model or SavedModel; "torch": a torch.export .pt2 (both: TFLite only)
    framework: Any = None  # TFSource / TorchSource for kinds "tf" and "torch"

    def describe(self) -> str:
        what = {"onnx": f"opset {self.opset}", "tf": "Keras/TensorFlow", "torch": "PyTorch (torch.export)"}[self.kind]
        return f"input {self.input.name!r} {list(self.input.shape)} float32, {what}"

    def runner(self) -> tuple[Any, str]:
        """(x -> first output of the float source model, that output's name)."""
        if self.framework is not None:
            name = self.framework.output_names[0]
            return (lambda x: self.framework.run(x)[name]), name
        session = source_session(self.path)
        in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
        return (lambda x: session.run([out_name], {in_name: x})[0]), out_name


# ---------------------------------------------------------------- the source


def inspect_source(path: Path, input_shape: str | None, workdir: Path) -> Source:
    """Check that ``path`` is a convertible ONNX model; with ``input_shape``
    write a copy whose non-batch input dims are fixed."""
    from converters.base import ConversionError, UnsupportedOp, load_onnx, require

    from converters.tflite_keras import is_tf_source
    from converters.tflite_torch import is_torch_source

    path = Path(path)
    if is_tf_source(path) or is_torch_source(path):
        return inspect_framework_source(path, input_shape)
    onnx = require("onnx", "convert-onnx", "reading ONNX models")
    if not path.is_file():
        raise BadInput(f"{path}: no such model file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise BadInput(f"{path.name}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise BadInput(f"{path.name}: not an ONNX model (no graph nodes, inputs or outputs)")
    max_opset = onnx.defs.onnx_opset_version()
    opset = 0
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = int(imp.version)
            if opset > max_opset or opset < 7:
                raise UnsupportedOp(
                    f"{path.name}: ONNX opset {opset} is not supported; this onnx {onnx.__version__} "
                    f"handles opsets 7..{max_opset} (re-export with an opset in that range)"
                )
    for node in model.graph.node:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type, domain):
            raise UnsupportedOp(
                f"{path.name}: operator {node.op_type!r} (domain {domain or 'ai.onnx'!r}, node "
                f"{node.name or '?'}) is not a standard ONNX operator; it cannot be converted"
            )
    try:
        load_onnx(path, "convert-onnx")  # onnx.checker
    except ConversionError as exc:
        raise BadInput(str(exc)) from None
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    if len(graph_inputs) != 1:
        raise BadInput(f"{path.name}: edged convert supports models with one input, found {len(graph_inputs)}")
    vi = graph_inputs[0]
    tt = vi.type.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        raise BadInput(
            f"{path.name}: input {vi.name!r} is {onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)}; "
            "only float32 inputs can be calibrated and quantized"
        )
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim)
    if not shape:
        raise BadInput(f"{path.name}: input {vi.name!r} has no shape; pass --input-shape")
    if input_shape:
        fixed = parse_shape(input_shape)
        if len(fixed) != len(shape):
            raise BadInput(
                f"--input-shape {input_shape}: the model input {vi.name!r} has {len(shape)} dims "
                f"{list(shape)}, got {len(fixed)}"
            )
        for i, (want, got) in enumerate(zip(shape, fixed)):
            if i > 0 and want > 0 and want != got:
                raise BadInput(f"--input-shape {input_shape}: dim {i} of {vi.name!r} is fixed to {want} in the model")
        for i, dim in enumerate(tt.shape.dim):
            if i == 0:
                continue  # the batch dimension stays dynamic
            dim.Clear()
            dim.dim_value = fixed[i]
        if shape[0] > 0:
            tt.shape.dim[0].Clear()
            tt.shape.dim[0].dim_param = "N"
        # Shapes of intermediate values were inferred for the old dims; drop them.
        del model.graph.value_info[:]
        fixed_path = workdir / path.name
        onnx.save(model, str(fixed_path))
        return Source(fixed_path, path, ModelInput(vi.name, (-1, *fixed[1:]), "float32"), opset)
    return Source(path, path, ModelInput(vi.name, shape, "float32"), opset)


def inspect_framework_source(path: Path, input_shape: str | None) -> Source:
    """A Keras model (.keras/.h5), SavedModel directory or torch.export .pt2: TFLite int8 only."""
    from converters.base import ConversionError
    from converters.tflite_keras import is_tf_source, load_tf_source
    from converters.tflite_torch import load_torch_source

    if input_shape:
        raise BadInput("--input-shape applies to ONNX sources; export a Keras/PyTorch source with a static input shape")
    kind = "tf" if is_tf_source(path) else "torch"
    try:
        loaded = load_tf_source(path) if kind == "tf" else load_torch_source(path)
    except ConversionError as exc:
        raise BadInput(str(exc)) from None
    return Source(path, path, ModelInput(loaded.input_name, loaded.input_shape, "float32"), 0, kind, loaded)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise BadInput(f"--input-shape {text!r}: expected comma-separated integers, e.g. 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise BadInput(f"--input-shape {text!r}: every dimension must be a positive integer")
    return dims


# ------------------------------------------------------------------ the data


def _npz_pick(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as data:
        if not data.files:
            raise BadInput(f"{path}: empty .npz")
        key = next((k for k in ("x", "input", "inputs") if k in data.files), data.files[0])
        y = next((data[k] for k in ("y", "labels", "label") if k in data.files and k != key), None)
        return data[key], y


def load_arrays(spec: str, model_input: ModelInput, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Data from a .npz/.npy file, an image directory or a ``module:function``.
    Returns (x, y or None); y comes from a ``y``/``labels`` key of a .npz."""
    path = Path(spec)
    if path.is_dir():
        return load_images(path, model_input), None
    if path.is_file():
        try:
            if path.suffix == ".npz":
                return _npz_pick(path)
            if path.suffix == ".npy":
                return np.load(path, allow_pickle=False), None
        except (OSError, ValueError) as exc:
            raise BadInput(f"{what} {path}: cannot read ({exc})") from None
        raise BadInput(f"{what} {path}: expected .npz, .npy, a directory of images or module:function")
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        module_name, func_name = spec.split(":")
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise BadInput(f"{what} {spec}: cannot import ({exc})") from None
        try:
            result = func()
        except Exception as exc:
            raise BadInput(f"{what} {spec}: the function raised {type(exc).__name__}: {exc}") from None
        if isinstance(result, tuple) and len(result) == 2:
            return np.asarray(result[0]), np.asarray(result[1])
        return np.asarray(result), None
    raise BadInput(f"{what} {spec}: no such file or directory (and not a module:function)")


def image_layout(model_input: ModelInput) -> tuple[str, int, int, int]:
    """(layout, channels, H, W) for a 4-D image input; NCHW when dim 1 is 1 or 3."""
    shape = model_input.shape
    if len(shape) != 4:
        raise BadInput(f"image calibration needs a 4-D model input, {model_input.name!r} is {list(shape)}")
    if shape[1] in (1, 3):
        layout, c, h, w = "NCHW", shape[1], shape[2], shape[3]
    elif shape[3] in (1, 3):
        layout, c, h, w = "NHWC", shape[3], shape[1], shape[2]
    else:
        raise BadInput(f"image calibration: cannot tell the channel dim of {list(shape)} (want 1 or 3 channels)")
    if h <= 0 or w <= 0:
        raise BadInput(f"image calibration needs a static H and W; the model input is {list(shape)}: pass --input-shape")
    return layout, c, h, w


def load_images(directory: Path, model_input: ModelInput) -> np.ndarray:
    """Preprocessing: grayscale (1 channel) or RGB (3), resized to the model's
    H x W (bilinear), scaled to 0..1 float32, laid out as the model input."""
    if importlib.util.find_spec("PIL") is None:
        raise BadInput(
            f"calibration from an image directory ({directory}) needs Pillow: pip install 'edged[convert-images]'"
        )
    from PIL import Image

    layout, c, h, w = image_layout(model_input)
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInput(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        try:
            with Image.open(file) as img:
                img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                a = np.asarray(img, dtype=np.float32) / 255.0
        except OSError as exc:
            raise BadInput(f"{file}: cannot read image ({exc})") from None
        a = a.reshape(h, w, c)
        images.append(a.transpose(2, 0, 1) if layout == "NCHW" else a)
    return np.stack(images)


def check_data(x: np.ndarray, model_input: ModelInput, what: str) -> np.ndarray:
    """float32 [N, *model dims]; BadInput naming expected vs got otherwise."""
    x = np.asarray(x)
    expected = "[N, " + ", ".join("?" if d < 0 else str(d) for d in model_input.shape[1:]) + "]"
    if x.dtype.kind != "f":
        raise BadInput(
            f"{what}: dtype mismatch for input {model_input.name!r}: expected float32 {expected}, "
            f"got {x.dtype} {list(x.shape)} (scale the data to floats the way the model was trained)"
        )
    if x.ndim != len(model_input.shape) or any(
        want > 0 and got != want for want, got in zip(model_input.shape[1:], x.shape[1:])
    ):
        raise BadInput(
            f"{what}: shape mismatch for input {model_input.name!r}: expected {expected}, got {list(x.shape)}"
        )
    if len(x) == 0:
        raise BadInput(f"{what}: no samples")
    if not np.all(np.isfinite(x)):
        raise BadInput(f"{what}: contains NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


# -------------------------------------------------------------- the report


def _top1(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(len(a), -1).argmax(axis=1)


def _latency_ms(call: Any, x: np.ndarray, runs: int) -> dict[str, float]:
    for i in range(LATENCY_WARMUP):
        call(x[i % len(x):i % len(x) + 1])
    times = []
    for i in range(runs):
        one = x[i % len(x):i % len(x) + 1]
        start = time.perf_counter()
        call(one)
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50": round(float(np.percentile(times, 50)), 4), "p99": round(float(np.percentile(times, 99)), 4)}


def source_session(source: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(source), sess_options=so, providers=["CPUExecutionProvider"])


def build_report(bundle_root: Path, source: Source, x: np.ndarray, y: np.ndarray | None,
                 data_name: str, runs: int = LATENCY_RUNS) -> dict[str, Any]:
    """Converted vs source on ``x``: agreement, accuracy, output error, latency
    (batch 1, one thread, ``runs`` runs each) and size."""
    from edged.bundle import open_bundle
    from edged.model import LoadedModel
    from edged.runtimes import RuntimeOptions

    bundle = open_bundle(bundle_root)
    run_source, first_out = source.runner()
    ref = run_source(x)
    model = LoadedModel.load(bundle, RuntimeOptions(threads=1), warmup=0)
    try:
        conv_in = bundle.manifest.inputs[0].name
        out_name = first_out if first_out in {o.name for o in bundle.manifest.outputs} else bundle.manifest.outputs[0].name
        got = model.infer({conv_in: x})[out_name].astype(np.float64)
        conv_latency = _latency_ms(lambda b: model.infer({conv_in: b}), x, runs)
    finally:
        model.unload()
    src_latency = _latency_ms(run_source, x, runs)
    err = np.abs(got - ref.astype(np.float64))
    ref_top, conv_top = _top1(ref), _top1(got)
    report: dict[str, Any] = {
        "data": data_name,
        "samples": int(len(x)),
        "output": out_name,
        "top1_agreement": float(np.mean(ref_top == conv_top)),
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "latency_ms": {"source": src_latency, "converted": conv_latency},
        "latency_setup": f"batch 1, 1 thread, {runs} runs each after {LATENCY_WARMUP} warm-up, this machine; "
                         f"source on {SOURCE_RUNNERS[source.kind]}, "
                         "converted through edged's runtime "
                         f"({bundle.manifest.runtime}) incl. input/output (de)quantization",
        "size_bytes": {
            "source": source.original.stat().st_size,
            "converted": sum(e.size for rel, e in bundle.manifest.files.items() if rel not in ("samples.npz", "report.json")),
        },
    }
    if y is not None:
        y = np.asarray(y).reshape(-1)
        report["accuracy_source"] = float(np.mean(ref_top == y))
        report["accuracy_converted"] = float(np.mean(conv_top == y))
        report["accuracy_drop_points"] = round(100.0 * (report["accuracy_source"] - report["accuracy_converted"]), 4)
    report["agreement_drop_points"] = round(100.0 * (1.0 - report["top1_agreement"]), 4)
    return report


SOURCE_RUNNERS = {"onnx": "onnxruntime CPU", "tf": "TensorFlow (eager Keras call)", "torch": "PyTorch (eager, per sample)"}


def gate_drop(report: dict[str, Any]) -> tuple[float, str]:
    """The drop the gate checks: accuracy with labels, else top-1 agreement."""
    if "accuracy_drop_points" in report:
        return float(report["accuracy_drop_points"]), "accuracy"
    return float(report["agreement_drop_points"]), "top-1 agreement"


# ----------------------------------------------------------- one conversion


@dataclass
class Plan:
    runtime: str
    precision: str
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def plan_for(profile: Any, source: Source) -> Plan:
    """Runtime and precision from the profile; Skipped when this machine can't."""
    from converters.base import ConverterUnavailable, require
    from edged.runtimes import BACKENDS

    runtime, precision = profile.output, profile.precision
    plan = Plan(runtime, precision, provenance={"profile": profile.name, "profile_precision": precision})
    if source.kind != "onnx" and runtime != "tflite":
        what = "Keras/SavedModel" if source.kind == "tf" else "PyTorch (.pt2)"
        raise Skipped(f"{what} sources become TFLite only; profile {profile.name} wants {runtime} "
                      "(export the model to ONNX for that target)")
    backend = BACKENDS[runtime]
    if backend.library() is None:
        raise Skipped(f"runtime {runtime} is not installed here: pip install 'edged[{backend.extra}]'")
    try:
        if runtime == "onnx":
            require("onnxruntime", "convert-onnx", "the ONNX converter")
        elif runtime == "openvino":
            require("openvino", "convert-openvino", "the OpenVINO converter")
            if precision == "int8":
                require("nncf", "convert-openvino", "OpenVINO int8 quantization")
        elif runtime == "tflite" and source.kind == "tf":
            require("tensorflow", "convert-tf", "Keras/SavedModel to TFLite conversion")
        elif runtime == "tflite" and source.kind == "torch":
            require("litert_torch", "convert-torch", "PyTorch to TFLite conversion")
        elif runtime == "tflite":
            require("ai_edge_litert", "convert-tflite", "the TFLite writer")
            require("flatbuffers", "convert-tflite", "the TFLite writer")
    except ConverterUnavailable as exc:
        raise Skipped(str(exc)) from None
    if runtime == "onnx" and precision == "fp16" and importlib.util.find_spec("onnxconverter_common") is None:
        fallback = profile.fallback_precision
        if not fallback:
            raise Skipped("ONNX fp16 needs onnxconverter-common (pip install onnxconverter-common)")
        reason = (f"profile precision fp16 needs onnxconverter-common, which is not installed; "
                  f"used the profile's fallback_precision {fallback}")
        plan.precision = fallback
        plan.notes.append(reason)
        plan.provenance["precision_fallback"] = reason
    if runtime == "tflite" and plan.precision != "int8":
        raise Skipped(f"the TFLite writer only produces full-integer int8, profile asks for {plan.precision}")
    if runtime in STATIC_SHAPE_RUNTIMES and source.input.dynamic_non_batch:
        dims = ", ".join(str(i) for i in source.input.dynamic_non_batch)
        raise BadInput(
            f"{source.original.name}: input {source.input.name!r} has dynamic non-batch dims ({dims}) "
            f"{list(source.input.shape)}; {runtime} needs static shapes: pass --input-shape, "
            "e.g. --input-shape 1," + ",".join("224" if d < 0 else str(d) for d in source.input.shape[1:])
        )
    return plan


def make_converter(plan: Plan, profile: Any, source: Source) -> Any:
    from converters import get_converter

    if source.kind == "tf":
        from converters.tflite_keras import KerasTFLiteConverter

        return KerasTFLiteConverter()
    if source.kind == "torch":
        from converters.tflite_torch import TorchTFLiteConverter

        return TorchTFLiteConverter(per_channel=bool(profile.runtime_options("onnx").get("per_channel", True)))
    if plan.runtime == "tflite":
        per_channel = bool(profile.runtime_options("onnx").get("per_channel", True))
        return tflite_converter_for_onnx(source.path, per_channel)
    return get_converter(plan.runtime, precision=plan.precision)


def tflite_converter_for_onnx(path: Path, per_channel: bool) -> Any:
    """The TensorFlow-free writer when the ONNX graph is an MLP it supports;
    otherwise onnx2torch + litert-torch when the convert-torch extra is there;
    otherwise the writer's UnsupportedOp, with the extra to install."""
    from converters import get_converter
    from converters.base import UnsupportedOp, load_onnx
    from converters.onnx_torch import available as torch_route_available
    from converters.tflite_int8 import parse_onnx

    try:
        parse_onnx(load_onnx(path, "convert-tflite"))
    except UnsupportedOp as exc:
        if not torch_route_available():
            raise UnsupportedOp(
                f"{exc}; ONNX models beyond MLPs (convolutions, pooling, ...) become TFLite through "
                "onnx2torch and litert-torch: pip install 'edged[convert-torch]'"
            ) from None
        from converters.tflite_torch import TorchTFLiteConverter

        return TorchTFLiteConverter(per_channel=per_channel)
    return get_converter("tflite", per_channel=per_channel)


def convert_one(
    source: Source, profile: Any, calib: np.ndarray, *, holdout_x: np.ndarray | None, holdout_y: np.ndarray | None,
    out_dir: Path, bundle_name: str, version: str, max_drop: float, calib_note: str, console: Any,
    runs: int = LATENCY_RUNS,
) -> dict[str, Any]:
    """Convert for one profile into ``out_dir/bundle_name`` (atomically) and
    return {"bundle": path, "report": ..., "plan": ..., "seconds": ...}."""
    from rich.markup import escape

    from converters.base import BundleInfo
    from edged.bundle import open_bundle, write_bundle

    plan = plan_for(profile, source)
    for note in plan.notes:
        console.print(f"[yellow]note[/]: {profile.name}: {escape(note)}", highlight=False)
    converter = make_converter(plan, profile, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle_name}-staging-", dir=out_dir))
    try:
        info = BundleInfo(
            name=bundle_name, version=version, hw_profile=profile.name,
            validation_x=holdout_x, validation_y=holdout_y,
            extra_provenance={**plan.provenance, "calibration": calib_note, "source_opset": source.opset,
                              "tool": "edged convert"},
        )
        began = time.perf_counter()
        with console.status(f"{profile.name}: quantizing to {plan.runtime} {plan.precision} "
                            f"with {len(calib)} calibration samples..."):
            converter.convert(source.path, profile, calib, dest=staging / "bundle", info=info)
        convert_s = time.perf_counter() - began
        console.print(f"[green]✓[/] {profile.name}: quantized to {plan.runtime} {plan.precision} ({convert_s:.1f}s)")
        x, y, data_name = (holdout_x, holdout_y, "holdout") if holdout_x is not None else (calib, holdout_y, "calibration")
        with console.status(f"{profile.name}: validating on {len(x)} {data_name} samples, {runs} latency runs each..."):
            report = build_report(staging / "bundle", source, x, y, data_name, runs)
        report["conversion_seconds"] = round(convert_s, 3)
        report["runtime"], report["precision"], report["profile"] = plan.runtime, plan.precision, profile.name
        if plan.notes:
            report["notes"] = plan.notes
        drop, metric = gate_drop(report)
        report["max_accuracy_drop_points"] = max_drop
        report["gate"] = {"metric": metric, "drop_points": drop, "passed": drop <= max_drop}
        console.print(f"[green]✓[/] {profile.name}: validated ({metric} drop {drop:.2f} points)")
        if drop > max_drop:
            raise AccuracyGateFailed(
                f"{profile.name}: {metric} dropped {drop:.2f} points > --max-accuracy-drop {max_drop}; no bundle written",
                report,
            )
        trial = open_bundle(staging / "bundle")
        manifest = trial.manifest
        manifest.validation = {**manifest.validation, **report}
        files = {rel: trial.root / rel for rel in manifest.files if rel not in ("samples.npz", "report.json")}
        samples_in, samples_out = trial.load_samples()
        dest = out_dir / bundle_name
        bundle = write_bundle(
            dest, manifest, files, samples_in, samples_out,
            extra_files={"report.json": (json.dumps(report, indent=2) + "\n").encode()},
        )
        console.print(f"[green]✓[/] {profile.name}: wrote {bundle.root}")
        return {"bundle": bundle.root, "report": report, "plan": plan}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------ printing


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def report_table(report: dict[str, Any], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("source fp32", justify="right")
    table.add_column(f"converted ({report.get('runtime', '?')} {report.get('precision', '')})", justify="right")
    lat = report["latency_ms"]
    size = report["size_bytes"]
    table.add_row("samples", f"{report['samples']} ({report['data']})", "")
    table.add_row("top-1 agreement", "", _pct(report["top1_agreement"]))
    if "accuracy_source" in report:
        table.add_row("accuracy", _pct(report["accuracy_source"]), _pct(report["accuracy_converted"]))
        table.add_row("accuracy drop (points)", "", f"{report['accuracy_drop_points']:.2f}")
    table.add_row("max abs error", "", f"{report['max_abs_error']:.4g}")
    table.add_row("mean abs error", "", f"{report['mean_abs_error']:.4g}")
    table.add_row("latency p50 (ms)", f"{lat['source']['p50']:.3f}", f"{lat['converted']['p50']:.3f}")
    table.add_row("latency p99 (ms)", f"{lat['source']['p99']:.3f}", f"{lat['converted']['p99']:.3f}")
    table.add_row("size", f"{size['source'] / 1024:.1f} KiB", f"{size['converted'] / 1024:.1f} KiB")
    if "conversion_seconds" in report:
        table.add_row("conversion time", "", f"{report['conversion_seconds']:.2f} s")
    return table


# ----------------------------------------------------------------- command


def convert(
    source: Path = typer.Argument(..., help="float32 ONNX model, Keras model (.keras/.h5), TF SavedModel directory or PyTorch torch.export archive (.pt2)."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Hardware profile (hw-profiles/*.toml), e.g. rpi4."),
    all_profiles: bool = typer.Option(False, "--all-profiles", help="One bundle per shipped profile, named {name}-{profile}."),
    out: Path = typer.Option(Path("bundles"), "--out", "-o", help="Directory the bundle(s) are written into."),
    calib: Optional[str] = typer.Option(
        None, "--calib",
        help=".npz (key x/input or the first array), .npy, a directory of images (needs Pillow) or "
        "module:function returning an array. Default: the --holdout data, else random uniform 0..1 (warned).",
    ),
    calib_samples: int = typer.Option(DEFAULT_CALIB_SAMPLES, "--calib-samples", "--samples", min=1,
                                      help="Calibration samples used (the first N)."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Held-out data for validation (same formats); default the calibration set."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Integer labels (.npy) of the held-out set; a 'y' key in --holdout .npz works too."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name (default: the source file stem)."),
    version: str = typer.Option("1.0.0", "--version", help="Bundle version (semver)."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Points of accuracy (top-1 agreement without labels) the conversion may lose."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Fix dynamic non-batch dims, e.g. 1,3,224,224 (the batch stays dynamic)."),
    latency_runs: int = typer.Option(LATENCY_RUNS, "--latency-runs", min=1, help="Batch-1 runs per model for the latency figures."),
) -> None:
    """Convert a float32 model into a quantized, validated bundle for a hardware profile.

    ONNX sources become ONNX int8 QDQ, OpenVINO IR or TFLite int8 (MLPs directly; CNNs and other
    graphs through onnx2torch and litert-torch: pip install 'edged\\[convert-torch]').
    Keras/SavedModel sources become full-integer TFLite int8 with TensorFlow's converter
    (pip install 'edged\\[convert-tf]'). PyTorch .pt2 sources become int8 TFLite with
    litert-torch (pip install 'edged\\[convert-torch]').
    """
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, soft_wrap=True)  # errors stay on one line, greppable
    console = Console()

    def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
        err.print(f"[red]error[/]: {escape(message)}", highlight=False)
        raise typer.Exit(code)

    from converters.base import UnsupportedOp
    from edged.profiles import ProfileError, all_profiles as load_all, get_profile

    if bool(profile) == bool(all_profiles):
        fail("give exactly one of --profile NAME or --all-profiles; known profiles: " + ", ".join(load_all()))
    try:
        profiles = list(load_all().values()) if all_profiles else [get_profile(profile or "")]
    except ProfileError as exc:
        fail(str(exc))
    base_name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", source.stem)
    work = Path(tempfile.mkdtemp(prefix="edged-convert-"))
    try:
        try:
            with err.status("reading the source model..."):
                src = inspect_source(source, input_shape, work)
            err.print(f"[green]✓[/] source {source.name}: {src.describe()}")
            with err.status("loading calibration data..."):
                holdout_x = holdout_y = None
                if holdout:
                    hx, hy = load_arrays(holdout, src.input, "holdout data")
                    holdout_x = check_data(hx, src.input, f"holdout data {holdout}")
                    holdout_y = hy
                if labels is not None:
                    try:
                        holdout_y = np.load(labels, allow_pickle=False)
                    except (OSError, ValueError) as exc:
                        raise BadInput(f"labels {labels}: cannot read ({exc})") from None
                if calib:
                    cx, cy = load_arrays(calib, src.input, "calibration data")
                    calib_x = check_data(cx, src.input, f"calibration data {calib}")
                    calib_note = f"{calib}, first {min(calib_samples, len(calib_x))} samples"
                    if holdout_x is None and holdout_y is None and cy is not None:
                        holdout_y = np.asarray(cy).reshape(-1)[:calib_samples]
                elif holdout_x is not None:
                    calib_x, calib_note = holdout_x, f"--holdout {holdout} (no --calib given)"
                else:
                    if src.input.dynamic_non_batch:
                        raise BadInput("no --calib and the input has dynamic dims: pass --calib or --input-shape")
                    rng = np.random.default_rng(0)
                    calib_x = rng.random((calib_samples, *src.input.shape[1:]), dtype=np.float32)
                    calib_note = "random uniform 0..1 (no --calib given; pass real data for a useful int8 model)"
                    err.print("[yellow]warning[/]: no --calib: calibrating on random uniform 0..1 data")
                calib_x = calib_x[:calib_samples]
                if holdout_x is None and labels is not None and holdout_y is not None:
                    holdout_y = np.asarray(holdout_y).reshape(-1)[:calib_samples]  # labels of the calibration set
                validation_x = holdout_x if holdout_x is not None else calib_x
                if holdout_y is not None:
                    holdout_y = np.asarray(holdout_y).reshape(-1)
                    if holdout_y.dtype.kind not in "iu" or len(holdout_y) != len(validation_x):
                        raise BadInput(
                            f"labels: expected {len(validation_x)} integer labels for the "
                            f"{'holdout' if holdout_x is not None else 'calibration'} set, got {len(holdout_y)} {holdout_y.dtype}"
                        )
            err.print(f"[green]✓[/] calibration: {len(calib_x)} samples ({calib_note}); "
                      f"validation: {len(validation_x)} samples{', with labels' if holdout_y is not None else ''}")
        except EdgedError as exc:
            fail(str(exc))
        results: list[tuple[str, str, str]] = []
        exit_code = 0
        for prof in profiles:
            bundle_name = f"{base_name}-{prof.name}" if all_profiles else base_name
            try:
                result = convert_one(
                    src, prof, calib_x, holdout_x=holdout_x,
                    holdout_y=holdout_y,
                    out_dir=out, bundle_name=bundle_name, version=version, max_drop=max_accuracy_drop,
                    calib_note=calib_note, console=err, runs=latency_runs,
                )
            except Skipped as exc:
                err.print(f"[yellow]skipped[/] {prof.name}: {escape(str(exc))}", highlight=False)
                results.append((prof.name, "skipped", str(exc)))
                continue
            except UnsupportedOp as exc:
                if not all_profiles:
                    fail(str(exc))
                err.print(f"[yellow]skipped[/] {prof.name}: {escape(str(exc))}", highlight=False)
                results.append((prof.name, "skipped", str(exc)))
                continue
            except AccuracyGateFailed as exc:
                console.print(report_table(exc.report, f"{bundle_name}: validation report (FAILED)"))
                err.print(f"[red]error[/]: {escape(str(exc))}", highlight=False)
                results.append((prof.name, "failed", str(exc)))
                exit_code = max(exit_code, EXIT_ACCURACY)
                continue
            except EdgedError as exc:
                if not all_profiles:
                    fail(str(exc))
                err.print(f"[red]failed[/] {prof.name}: {escape(str(exc))}", highlight=False)
                results.append((prof.name, "failed", str(exc)))
                exit_code = max(exit_code, EXIT_BAD_INPUT)
                continue
            console.print(report_table(result["report"], f"{bundle_name}: validation report"))
            notes = "; ".join(result["plan"].notes)
            results.append((prof.name, "written", f"{result['bundle']}" + (f" ({notes})" if notes else "")))
        if all_profiles:
            from rich.table import Table

            summary = Table(title="edged convert --all-profiles")
            for col in ("profile", "status", "bundle / reason"):
                summary.add_column(col)
            for row in results:
                summary.add_row(*(escape(c) for c in row))
            console.print(summary)
        if exit_code:
            raise typer.Exit(exit_code)
    finally:
        shutil.rmtree(work, ignore_errors=True)
