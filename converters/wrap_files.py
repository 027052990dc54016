"""The model files ``edged bundle create`` wraps: which runtime serves a model file,
the files a bundle copies (an OpenVINO IR's weights, an ONNX model's external data)
and the precision the model computes in (read from its tensors and operators)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.wrap_samples import WrapError
from edged.tensors import TensorSpec

# suffix -> (runtime, model file name inside the bundle)
FORMATS = {".onnx": ("onnx", "model.onnx"), ".tflite": ("tflite", "model.tflite"), ".xml": ("openvino", "model.xml")}
_ONNX_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                   "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QGemm",
                   "QAttention", "QOrderedMatMul", "GatherBlockQuantized"}



@dataclass
class ModelFiles:
    """A model file, the runtime that serves it and the files a bundle copies."""

    source: Path
    runtime: str
    model_file: str
    files: dict[str, Path]  # name inside the bundle -> source file


def model_files(path: Path) -> ModelFiles:
    """The runtime and the files that make up the model at ``path``."""
    path = Path(path)
    if not path.exists():
        raise WrapError(f"{path}: no such file")
    if not path.is_file():
        raise WrapError(f"{path}: not a file; expected a .onnx, .tflite or OpenVINO .xml model")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise WrapError(
            f"{path.name}: unknown model format {suffix or '(no suffix)'}; expected .onnx, .tflite or OpenVINO .xml + .bin"
        )
    runtime, model_file = FORMATS[suffix]
    files = {model_file: path}
    if runtime == "openvino":
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise WrapError(f"{path.name}: an OpenVINO IR needs its weights {weights.name} beside it")
        files["model.bin"] = weights
    elif runtime == "tflite":
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head[4:8] != b"TFL3":
            raise WrapError(f"{path.name}: not a TFLite model (no TFL3 flatbuffer identifier)")
    else:
        for rel in _onnx_external_data(path):
            if rel in files or rel in ("manifest.json", "samples.npz"):
                raise WrapError(f"{path.name}: external data file {rel!r} clashes with a bundle file name")
            files[rel] = path.parent / rel
    return ModelFiles(source=path, runtime=runtime, model_file=model_file, files=files)


def _read_onnx(path: Path) -> Any:
    """The ONNX graph without external weights, or None (no onnx package, unreadable)."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends; the runtime names the problem
        return None


def _onnx_external_data(path: Path) -> list[str]:
    model = _read_onnx(path)
    if model is None:
        return []
    found: list[str] = []
    for tensor in model.graph.initializer:
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            continue
        rel = next((e.value for e in tensor.external_data if e.key == "location"), "")
        where = Path(rel)
        if not rel or where.is_absolute() or ".." in where.parts:
            raise WrapError(f"{path.name}: external data location {rel!r} is not a file beside the model")
        if not (path.parent / rel).is_file():
            raise WrapError(f"{path.name}: external data file {rel} is missing beside the model")
        if rel not in found:
            found.append(rel)
    return found


def model_precision(files: ModelFiles, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    """int8 (quantized tensors or operators), fp16 (float16 weights) or fp32;
    best effort, "unknown" when the model cannot be inspected."""
    try:
        found = _precisions(files)
    except Exception:  # best effort: a reader that chokes leaves the tensor specs
        found = set()
    if any(s.quantization is not None for s in inputs + outputs):
        found.add("int8")
    for precision in ("int8", "fp16", "fp32"):
        if precision in found:
            return precision
    return "unknown"


def _precisions(files: ModelFiles) -> set[str]:
    found: set[str] = set()
    if files.runtime == "onnx":
        model = _read_onnx(files.source)
        if model is not None:
            for node in model.graph.node:
                op = node.op_type
                if op in _ONNX_QUANT_OPS or op.startswith("QLinear") or (node.domain == "com.microsoft" and op.startswith("Q")):
                    found.add("int8")
            codes = {t.data_type for t in model.graph.initializer}
            found |= {"int8"} if codes & {2, 3, 21, 22} else set()  # UINT8, INT8, UINT4, INT4
            found |= {"fp16"} if codes & {10, 16} else set()  # FLOAT16, BFLOAT16
            found.add("fp32")
    elif files.runtime == "tflite":
        from edged.runtimes.tflite import _interpreter_class

        interpreter = _interpreter_class()(model_path=str(files.source))
        for detail in interpreter.get_tensor_details():
            dtype = np.dtype(detail["dtype"])
            found.add("int8" if dtype.kind in "iu" and detail["quantization"][0] else "fp16" if dtype == np.float16 else "fp32")
    else:
        import xml.etree.ElementTree as ET

        for layer in ET.parse(files.source).getroot().iter("layer"):
            data = layer.find("data")
            kind = data.get("element_type", "") if data is not None else ""
            if layer.get("type") == "FakeQuantize" or (layer.get("type") == "Const" and kind in ("i8", "u8", "i4", "u4")):
                found.add("int8")
            elif layer.get("type") == "Const" and kind in ("f16", "bf16"):
                found.add("fp16")
        found.add("fp32")
    return found
