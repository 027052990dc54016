"""ONNX -> full-integer int8 TFLite, without TensorFlow or torch.

The ONNX graph is read into layers by ``converters.tflite_int8_graph`` (an MLP
subset: Flatten/Reshape, Gemm/MatMul(+Add), Relu; anything else raises
``UnsupportedOp`` naming the op). The .tflite flatbuffer is written directly
with the object API that ai-edge-litert ships
(``ai_edge_litert.schema_py_generated``) and ``flatbuffers.Builder``: reshapes
become ``RESHAPE``, fully-connected layers ``FULLY_CONNECTED`` (a following
Relu fused), other Relus ``RELU``.

Quantization is the TFLite full-integer scheme: int8 input/output tensors with
scale and zero point (asymmetric, ranges calibrated by a numpy forward pass of
the float model on the calibration data), int8 symmetric per-channel weights,
int32 biases with scale ``input_scale * weight_scale[c]``. The batch dimension
stays dynamic (``shape_signature`` ``[-1, ...]``); the model is stored with
batch 1 and interpreters resize it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from converters.base import (
    BundleInfo,
    ConversionError,
    dist_version,
    finish_bundle,
    onnx_model_inputs,
    load_onnx,
    require,
)
from converters.data import Samples, as_samples
from converters.tflite_int8_graph import Graph, parse_onnx
from edged.bundle import Bundle
from edged.tensors import Quantization, TensorSpec

EXTRA = "convert-tflite"
LAYOUTS = {2: "NC", 3: "NCW", 4: "NCHW"}


def _act_quant(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 scale and zero point covering [lo, hi] and 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = float(np.float32((hi - lo) / 255.0))
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zero_point


def build_tflite(graph: Graph, calibration: np.ndarray, per_channel: bool = True) -> tuple[bytes, dict[str, Quantization]]:
    """Calibrate and write the flatbuffer; returns it and the quantization of
    every tensor by ONNX name."""
    schema = require("ai_edge_litert.schema_py_generated", EXTRA, "writing .tflite files")
    flatbuffers = require("flatbuffers", EXTRA, "writing .tflite files")

    ranges: dict[str, list[float]] = {}
    batch = 64
    for start in range(0, len(calibration), batch):
        graph.forward(calibration[start:start + batch], ranges)

    quant: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # name -> scales, zero points, axis

    def act(name: str) -> tuple[np.ndarray, np.ndarray, int]:
        if name not in quant:
            s, z = _act_quant(*ranges[name])
            quant[name] = (np.array([s], np.float32), np.array([z], np.int64), 0)
        return quant[name]

    act(graph.input)
    for layer in graph.layers:
        if layer.kind == "reshape":
            quant[layer.out] = act(layer.inp)  # RESHAPE needs identical in/out quantization
        else:
            act(layer.out)

    buffers = [schema.BufferT()]
    tensors: list[Any] = []
    index: dict[str, int] = {}

    def add_tensor(name: str, shape: tuple[int, ...], signature: tuple[int, ...], ttype: int,
                   q: tuple[np.ndarray, np.ndarray, int] | None, data: bytes | None = None) -> int:
        t = schema.TensorT()
        t.name = name
        t.shape = np.array(shape, np.int32)
        if signature != shape:
            t.shapeSignature = np.array(signature, np.int32)
        t.type = ttype
        if data is None:
            t.buffer = 0
        else:
            b = schema.BufferT()
            b.data = np.frombuffer(data, np.uint8).copy()
            buffers.append(b)
            t.buffer = len(buffers) - 1
        if q is not None:
            qp = schema.QuantizationParametersT()
            qp.scale = [float(s) for s in q[0]]
            qp.zeroPoint = [int(z) for z in q[1]]
            qp.quantizedDimension = q[2]
            t.quantization = qp
        tensors.append(t)
        return len(tensors) - 1

    def activation(name: str) -> int:
        if name not in index:
            shape = graph.shapes[name]
            index[name] = add_tensor(name, (1,) + shape, (-1,) + shape, schema.TensorType.INT8, act(name))
        return index[name]

    opcodes: list[Any] = []
    opcode_index: dict[int, int] = {}

    def opcode(code: int, version: int) -> int:
        if code not in opcode_index:
            oc = schema.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = version
            opcodes.append(oc)
            opcode_index[code] = len(opcodes) - 1
        return opcode_index[code]

    ops = schema.BuiltinOperator
    operators: list[Any] = []
    graph_in = activation(graph.input)
    for layer in graph.layers:
        op = schema.OperatorT()
        x = activation(layer.inp)
        if layer.kind == "reshape":
            new_shape = np.array((-1,) + layer.shape, np.int32)
            shape_t = add_tensor(f"{layer.out}/shape", (len(new_shape),), (len(new_shape),),
                                 schema.TensorType.INT32, None, new_shape.tobytes())
            op.opcodeIndex = opcode(ops.RESHAPE, 1)
            op.inputs = [x, shape_t]
            op.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
            options = schema.ReshapeOptionsT()
            options.newShape = [int(d) for d in new_shape]
            op.builtinOptions = options
        elif layer.kind == "fc":
            assert layer.weight is not None
            w = layer.weight.astype(np.float64)
            absmax = np.abs(w).max(axis=1) if per_channel else np.full(w.shape[0], np.abs(w).max())
            w_scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
            w_q = np.clip(np.round(w / w_scale[:, None].astype(np.float64)), -127, 127).astype(np.int8)
            w_qp = (w_scale if per_channel else w_scale[:1], np.zeros(len(w_scale) if per_channel else 1, np.int64), 0)
            w_t = add_tensor(f"{layer.out}/weights", w.shape, w.shape, schema.TensorType.INT8, w_qp, w_q.tobytes())
            in_scale = float(quant[layer.inp][0][0])
            b_scale = (np.float64(in_scale) * w_scale.astype(np.float64)).astype(np.float32)
            bias = layer.bias if layer.bias is not None else np.zeros(w.shape[0], np.float32)
            b_q = np.clip(np.round(bias / b_scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
            b_qp = (b_scale if per_channel else b_scale[:1], np.zeros(len(b_scale) if per_channel else 1, np.int64), 0)
            b_t = add_tensor(f"{layer.out}/bias", (w.shape[0],), (w.shape[0],), schema.TensorType.INT32, b_qp, b_q.tobytes())
            op.opcodeIndex = opcode(ops.FULLY_CONNECTED, 4)
            op.inputs = [x, w_t, b_t]
            op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
            options = schema.FullyConnectedOptionsT()
            options.fusedActivationFunction = (
                schema.ActivationFunctionType.RELU if layer.relu else schema.ActivationFunctionType.NONE
            )
            options.weightsFormat = schema.FullyConnectedOptionsWeightsFormat.DEFAULT
            options.keepNumDims = False
            op.builtinOptions = options
        else:
            op.opcodeIndex = opcode(ops.RELU, 2)
            op.inputs = [x]
        op.outputs = [activation(layer.out)]
        operators.append(op)

    subgraph = schema.SubGraphT()
    subgraph.tensors = tensors
    subgraph.inputs = [graph_in]
    subgraph.outputs = [index[name] for name in graph.outputs]
    subgraph.operators = operators
    subgraph.name = "main"
    model = schema.ModelT()
    model.version = 3
    model.operatorCodes = opcodes
    model.subgraphs = [subgraph]
    model.description = "edged converters.tflite_int8 (full-integer int8)"
    model.buffers = buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    quantization = {
        name: Quantization(scale=float(q[0][0]), zero_point=int(q[1][0])) for name, q in quant.items()
    }
    return bytes(builder.Output()), quantization


class TFLiteInt8Converter:
    """Float ONNX (supported subset) -> int8 .tflite bundle."""

    name = "tflite_int8"
    runtime = "tflite"
    extra = EXTRA

    def __init__(self, per_channel: bool = True) -> None:
        self.per_channel = per_channel

    def convert(self, source: Path, profile: Any, calibration: Samples | np.ndarray, *, dest: Path,
                info: BundleInfo) -> Bundle:
        require("ai_edge_litert", EXTRA, "the TFLite converter")
        require("flatbuffers", EXTRA, "the TFLite converter")
        source = Path(source)
        model = load_onnx(source, EXTRA)
        graph = parse_onnx(model)
        samples = as_samples(calibration, onnx_model_inputs(model))
        calibration = samples.single()
        if calibration.ndim < 2 or tuple(calibration.shape[1:]) != graph.input_shape:
            raise ConversionError(
                f"calibration data shape {list(calibration.shape)} does not fit input [N, {', '.join(map(str, graph.input_shape))}]"
            )
        flat, quant = build_tflite(graph, calibration, self.per_channel)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        model_path = dest.parent / f".{dest.name}.model.tflite"
        model_path.write_bytes(flat)

        def spec(name: str, shape: tuple[int, ...]) -> TensorSpec:
            full = (-1,) + shape
            return TensorSpec(name, "int8", full, LAYOUTS.get(len(full), ""), quant[name])

        if graph.output_names != graph.outputs:
            raise ConversionError("outputs produced by Identity/Dropout aliases are not supported")

        def reference(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return graph.forward(np.asarray(feed[graph.input], dtype=np.float32))

        try:
            return finish_bundle(
                dest=dest, info=info, profile=profile, runtime="tflite", model_file="model.tflite",
                files={"model.tflite": model_path},
                inputs=[spec(graph.input, graph.input_shape)],
                outputs=[spec(n, graph.shapes[n]) for n in graph.outputs],
                calibration=samples, reference=reference, source=source,
                provenance={
                    "converter": self.name,
                    "precision": "int8",
                    "weights": "per-channel symmetric int8" if self.per_channel else "per-tensor symmetric int8",
                    "activations": "asymmetric int8 (min/max calibration)",
                    "tools": {
                        "edged.converters": "tflite_int8 flatbuffer writer",
                        "ai-edge-litert": dist_version("ai-edge-litert"),
                        "flatbuffers": dist_version("flatbuffers"),
                        "onnx": dist_version("onnx"),
                        "numpy": dist_version("numpy"),
                    },
                },
            )
        finally:
            model_path.unlink(missing_ok=True)
