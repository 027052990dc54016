"""The source model: what it is, its inputs, and how to run it in float.

ONNX models are checked up front (opset, operators, already quantized) so a
conversion never fails late for something knowable at the start. Formats that
edged serves as they are (``.tflite``, OpenVINO ``.xml``, ONNX with quantized
or vendor operators) are refused with ``edged bundle create`` as the way in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from converters.data import ModelInput, Samples
from converters.errors import BadInput, ConversionError, UnsupportedOp

Feed = dict[str, np.ndarray]
AS_IS_SUFFIXES = {".tflite": "TFLite", ".xml": "OpenVINO IR", ".bin": "OpenVINO IR weights"}
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger",
}
SOURCE_RUNNERS = {"onnx": "onnxruntime CPU", "tf": "TensorFlow (eager Keras call)", "torch": "PyTorch (eager)"}


def serve_as_is_hint(path: Path) -> str:
    return (f"serve it as it is: edged bundle create {path.name}"
            " (reads its tensors, writes samples and a manifest)")


@dataclass
class Source:
    path: Path  # the model as given (onnxruntime and OpenVINO keep its dynamic dims), or with --input-shape fixed
    original: Path
    static_path: Path | None = None  # a copy with the dynamic dims fixed, for TFLite routes
    inputs: list[ModelInput] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    opset: int = 0
    kind: str = "onnx"  # "tf": Keras model or SavedModel; "torch": torch.export .pt2 (TFLite only)
    framework: Any = None  # TFSource / TorchSource for kinds "tf" and "torch"
    notes: list[str] = field(default_factory=list)
    _session: Any = None

    @property
    def input(self) -> ModelInput:
        """The first input (single-input converters)."""
        return self.inputs[0]

    def describe(self) -> str:
        what = {"onnx": f"ONNX opset {self.opset}", "tf": "Keras/TensorFlow", "torch": "PyTorch (torch.export)"}
        ins = ", ".join(i.describe() for i in self.inputs)
        return f"{what[self.kind]}; inputs {ins}; outputs {', '.join(self.output_names)}"

    def run(self, feed: Feed) -> Feed:
        """One call of the float source model."""
        if self.framework is not None:
            x = feed[self.inputs[0].name]
            return dict(self.framework.run(x))
        if self._session is None:
            self._session = source_session(self.path)
        values = self._session.run(self.output_names, feed)
        return dict(zip(self.output_names, values))

    def run_all(self, samples: Samples) -> dict[str, np.ndarray]:
        """Every sample, one call each; outputs stacked to [N, ...]."""
        return run_per_sample(self.run, samples)


def run_per_sample(call: Callable[[Feed], Feed], samples: Samples) -> dict[str, np.ndarray]:
    results = [call(feed) for feed in samples]
    return {name: np.stack([np.asarray(r[name]) for r in results]) for name in results[0]}


def source_session(path: Path, threads: int = 1) -> Any:
    from converters.base import require

    ort = require("onnxruntime", "convert-onnx", "running the fp32 source model")
    ort.set_default_logger_severity(3)  # quantization tools log graph warnings to stderr otherwise
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionError(f"{Path(path).name}: onnxruntime cannot load the source model: {exc}") from None


def inspect_source(path: Path, input_shape_args: list[str], workdir: Path) -> Source:
    """Check that ``path`` is a convertible model; with ``--input-shape``
    values write a copy of an ONNX model whose dynamic dims are fixed."""
    from converters.tflite_keras import is_tf_source
    from converters.tflite_torch import is_torch_source

    path = Path(path)
    if is_tf_source(path) or is_torch_source(path):
        return inspect_framework_source(path, input_shape_args)
    if path.suffix.lower() in AS_IS_SUFFIXES:
        raise BadInput(f"{path.name}: a {AS_IS_SUFFIXES[path.suffix.lower()]} model is already built for its "
                       f"runtime and cannot be quantized again; {serve_as_is_hint(path)}")
    if not path.is_file():
        raise BadInput(f"{path}: no such model file")
    model = _load_onnx(path)
    opset = _check_operators(model, path)
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    inputs = [_model_input(vi) for vi in graph_inputs]
    input_shapes = parse_input_shapes(input_shape_args, inputs[0].name if len(inputs) == 1 else None)
    unknown = [n for n in input_shapes if n not in {i.name for i in inputs}]
    if unknown:
        raise BadInput(f"--input-shape {unknown[0]}=...: the model has no input {unknown[0]!r}; "
                       f"its inputs are {', '.join(i.describe() for i in inputs)}")
    source = Source(path, path, None, inputs, [o.name for o in model.graph.output], opset)
    if input_shapes:  # asked for: every target gets the fixed dims, if onnxruntime can still load them
        fix_input_shapes(source, model, input_shapes, workdir)
        try:
            source_session(source.static_path)
            source.path = source.static_path or source.path
        except ConversionError as exc:
            source.notes.append(f"onnxruntime cannot load the model with the fixed dims ({str(exc)[-160:]}); "
                                "ONNX and OpenVINO targets keep its dynamic dims, TFLite routes get the fixed copy")
    return source


def _load_onnx(path: Path) -> Any:
    from converters.base import load_onnx, require

    require("onnx", "convert-onnx", "reading ONNX models")
    try:
        return load_onnx(path, "convert-onnx")
    except ConversionError as exc:
        raise BadInput(str(exc)) from None


def _check_operators(model: Any, path: Path) -> int:
    import onnx

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
                f"{node.name or '?'}) is not a standard ONNX operator, so edged convert cannot requantize "
                f"the model; {serve_as_is_hint(path)}"
            )
        if node.op_type in QUANTIZED_OPS:
            raise BadInput(
                f"{path.name}: the model is already quantized (operator {node.op_type}, node "
                f"{node.name or '?'}); {serve_as_is_hint(path)}"
            )
    return opset


def _model_input(vi: Any) -> ModelInput:
    import onnx

    tt = vi.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim)
    return ModelInput(vi.name, shape, dtype)


def fix_input_shapes(source: Source, model: Any, shapes: dict[str, tuple[int, ...]], workdir: Path) -> None:
    """Fix the dynamic dims of the named inputs in a copy of the model; a
    dynamic batch dim 0 stays dynamic, a dim the model fixes must match."""
    import onnx

    by_name = {vi.name: vi for vi in model.graph.input}
    updated = []
    for spec in source.inputs:
        if spec.name not in shapes:
            updated.append(spec)
            continue
        fixed = shapes[spec.name]
        if len(fixed) != len(spec.shape):
            raise BadInput(f"--input-shape {spec.name}={','.join(map(str, fixed))}: the input has "
                           f"{len(spec.shape)} dims {list(spec.shape)}, got {len(fixed)}")
        dims = by_name[spec.name].type.tensor_type.shape.dim
        new_shape = []
        for i, (want, got) in enumerate(zip(spec.shape, fixed)):
            if want > 0 and want != got:
                raise BadInput(f"--input-shape {spec.name}=...: dim {i} of {spec.name!r} is fixed to {want} "
                               f"in the model, got {got}")
            if want < 0 and i > 0:
                dims[i].Clear()
                dims[i].dim_value = got
                new_shape.append(got)
            else:
                new_shape.append(want)
        updated.append(ModelInput(spec.name, tuple(new_shape), spec.dtype))
    del model.graph.value_info[:]  # shapes inferred for the old dims
    fixed_path = Path(workdir) / f"static-{source.original.name}"
    onnx.save(model, str(fixed_path))
    source.static_path, source.inputs = fixed_path, updated


def shapes_from_data(source: Source, samples: Samples, workdir: Path) -> None:
    """Fix dynamic non-batch dims of an ONNX source from the calibration data, and say so."""
    todo = {i.name: samples.arrays[i.name].shape[1:] for i in source.inputs
            if i.dynamic_non_batch and i.name in samples.arrays}
    if not todo or source.kind != "onnx":
        return
    import onnx

    fix_input_shapes(source, onnx.load(str(source.static_path or source.path)),
                     {k: tuple(v) for k, v in todo.items()}, workdir)
    for name, shape in todo.items():
        source.notes.append(f"input {name!r}: dynamic dims fixed to {list(shape)} from the calibration data")


def parse_input_shapes(values: list[str], default_input: str | None) -> dict[str, tuple[int, ...]]:
    """``--input-shape name=1,3,48,320`` (repeatable), or ``1,3,48,320`` for a single-input model."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in values:
        name, _, dims_text = text.rpartition("=")
        if not name:
            if default_input is None:
                raise BadInput(f"--input-shape {text}: the model has several inputs; write NAME=DIMS, "
                               "e.g. --input-shape x=1,3,48,320")
            name = default_input
        try:
            dims = tuple(int(p) for p in dims_text.replace("x", ",").split(",") if p.strip())
        except ValueError:
            raise BadInput(f"--input-shape {text!r}: expected comma-separated integers, e.g. 1,3,224,224") from None
        if not dims or any(d <= 0 for d in dims):
            raise BadInput(f"--input-shape {text!r}: every dimension must be a positive integer")
        shapes[name] = dims
    return shapes


def inspect_framework_source(path: Path, input_shapes: list[str]) -> Source:
    """A Keras model (.keras/.h5), SavedModel directory or torch.export .pt2: TFLite int8 only."""
    from converters.tflite_keras import is_tf_source, load_tf_source
    from converters.tflite_torch import load_torch_source

    if input_shapes:
        raise BadInput("--input-shape applies to ONNX sources; export a Keras/PyTorch source with a static input shape")
    kind = "tf" if is_tf_source(path) else "torch"
    try:
        loaded = load_tf_source(path) if kind == "tf" else load_torch_source(path)
    except ConversionError as exc:
        raise BadInput(str(exc)) from None
    inputs = [ModelInput(loaded.input_name, tuple(loaded.input_shape), "float32")]
    return Source(path, path, None, inputs, list(loaded.output_names), 0, kind, loaded)
