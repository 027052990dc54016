"""ONNX -> full-integer int8 TFLite, without TensorFlow or torch.

The .tflite flatbuffer is written directly with the object API that
ai-edge-litert ships (``ai_edge_litert.schema_py_generated``) and
``flatbuffers.Builder``.

Supported ONNX subset (anything else raises ``UnsupportedOp`` naming the op):

* ``Flatten`` (axis=1) and ``Reshape`` with a constant shape that keeps the
  batch dimension (``0`` or ``-1`` first) -> TFLite ``RESHAPE``
* ``Gemm`` (transA=0, any transB/alpha/beta, constant B and C) and ``MatMul``
  with a constant 2-D right-hand side, optionally followed by ``Add`` of a
  constant bias -> ``FULLY_CONNECTED``
* ``Relu`` -> fused into the preceding fully-connected layer, or a ``RELU`` op
* ``Identity``, ``Dropout`` (inference no-ops), ``Constant``

One float32 input whose first dimension is the batch. Quantization is the
TFLite full-integer scheme: int8 input/output tensors with scale and zero point
(asymmetric, ranges calibrated by a numpy forward pass of the float model on
the calibration data), int8 symmetric per-channel weights, int32 biases with
scale ``input_scale * weight_scale[c]``. The batch dimension stays dynamic
(``shape_signature`` ``[-1, ...]``); the model is stored with batch 1 and
interpreters resize it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.base import (
    BundleInfo,
    ConversionError,
    UnsupportedOp,
    dist_version,
    finish_bundle,
    onnx_model_inputs,
    load_onnx,
    require,
)
from converters.data import Samples, as_samples
from edged.bundle import Bundle
from edged.tensors import Quantization, TensorSpec

EXTRA = "convert-tflite"
SUPPORTED_OPS = ("Flatten", "Reshape", "Gemm", "MatMul", "Add", "Relu", "Identity", "Dropout", "Constant")
LAYOUTS = {2: "NC", 3: "NCW", 4: "NCHW"}


@dataclass
class Layer:
    kind: str  # "reshape" | "fc" | "relu"
    inp: str
    out: str
    shape: tuple[int, ...] = ()  # reshape: target shape without the batch dim
    weight: np.ndarray | None = None  # fc: [out_features, in_features]
    bias: np.ndarray | None = None
    relu: bool = False


@dataclass
class Graph:
    input: str
    input_shape: tuple[int, ...]  # without batch
    outputs: list[str]
    layers: list[Layer]
    shapes: dict[str, tuple[int, ...]]  # tensor -> shape without batch

    def forward(self, x: np.ndarray, record: dict[str, list[float]] | None = None) -> dict[str, np.ndarray]:
        """Float reference forward pass; ``record`` collects [min, max] per tensor."""
        env = {self.input: x.astype(np.float32)}

        def note(name: str) -> None:
            if record is not None:
                lo, hi = float(env[name].min()), float(env[name].max())
                old = record.get(name)
                record[name] = [min(lo, old[0]), max(hi, old[1])] if old else [lo, hi]

        note(self.input)
        for layer in self.layers:
            a = env[layer.inp]
            if layer.kind == "reshape":
                y = a.reshape((a.shape[0],) + layer.shape)
            elif layer.kind == "fc":
                assert layer.weight is not None
                y = a.reshape(a.shape[0], -1) @ layer.weight.T
                if layer.bias is not None:
                    y = y + layer.bias
                if layer.relu:
                    y = np.maximum(y, 0)
            else:
                y = np.maximum(a, 0)
            env[layer.out] = y.astype(np.float32)
            note(layer.out)
        return {name: env[name] for name in self.outputs}


def parse_onnx(model: Any) -> Graph:
    """Translate the supported ONNX subset into a list of layers."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in consts]
    if len(graph_inputs) != 1:
        raise ConversionError(f"the TFLite writer needs exactly one model input, found {len(graph_inputs)}")
    gin = graph_inputs[0]
    if gin.type.tensor_type.elem_type != 1:
        raise ConversionError(f"input {gin.name}: only float32 inputs can be quantized")
    dims = gin.type.tensor_type.shape.dim
    if len(dims) < 2 or any(not d.HasField("dim_value") for d in dims[1:]):
        raise ConversionError(f"input {gin.name}: needs a batch dimension followed by static dimensions")
    input_shape = tuple(int(d.dim_value) for d in dims[1:])
    outputs = [o.name for o in model.graph.output]

    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for name in outputs:
        consumers[name] = consumers.get(name, 0) + 1

    alias: dict[str, str] = {}
    shapes = {gin.name: input_shape}
    layers: list[Layer] = []
    producer: dict[str, Layer] = {}

    def real(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    def attrs(node: Any) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def activation(node: Any, name: str) -> str:
        name = real(name)
        if name not in shapes:
            raise UnsupportedOp(
                f"ONNX op {node.op_type} (node {node.name or '?'}): input {name} is not a computed activation "
                "(constant folding is not supported)"
            )
        return name

    def const(node: Any, name: str) -> np.ndarray:
        if name not in consts:
            raise UnsupportedOp(
                f"ONNX op {node.op_type} (node {node.name or '?'}): input {name} must be a constant initializer"
            )
        return consts[name]

    def fusable(name: str) -> Layer | None:
        layer = producer.get(name)
        if layer is not None and layer.kind == "fc" and consumers.get(name, 0) == 1 and name not in outputs:
            return layer
        return None

    def add_fc(node: Any, a: str, w: np.ndarray, b: np.ndarray | None) -> None:
        if len(shapes[a]) != 1:
            raise UnsupportedOp(
                f"ONNX op {node.op_type} (node {node.name or '?'}): only 2-D [batch, features] inputs are "
                f"supported, got [N, {', '.join(map(str, shapes[a]))}]; add a Flatten first"
            )
        if w.shape[1] != shapes[a][0]:
            raise ConversionError(f"node {node.name or node.op_type}: weight shape {w.shape} does not fit input {shapes[a]}")
        layer = Layer("fc", a, node.output[0], weight=w.astype(np.float32),
                      bias=None if b is None else np.broadcast_to(b, (w.shape[0],)).astype(np.float32).copy())
        layers.append(layer)
        producer[layer.out] = layer
        shapes[layer.out] = (w.shape[0],)

    for node in model.graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOp(f"ONNX op {node.domain}.{op} is not supported by the TFLite int8 writer")
        a = attrs(node)
        if op == "Constant":
            if "value" not in a:
                raise UnsupportedOp("ONNX op Constant: only the 'value' attribute is supported")
            consts[node.output[0]] = numpy_helper.to_array(a["value"])
        elif op in ("Identity", "Dropout"):
            alias[node.output[0]] = activation(node, node.input[0])
        elif op == "Flatten":
            x = activation(node, node.input[0])
            if int(a.get("axis", 1)) != 1:
                raise UnsupportedOp("ONNX op Flatten: only axis=1 is supported")
            layer = Layer("reshape", x, node.output[0], shape=(int(np.prod(shapes[x])),))
            layers.append(layer)
            shapes[layer.out] = layer.shape
        elif op == "Reshape":
            x = activation(node, node.input[0])
            target = [int(d) for d in const(node, node.input[1]).reshape(-1)]
            if not target or target[0] not in (0, -1):
                raise UnsupportedOp(f"ONNX op Reshape: target shape {target} must keep the batch dimension (0 or -1 first)")
            rest = [shapes[x][i] if d == 0 and i < len(shapes[x]) else d for i, d in enumerate(target[1:])]
            if rest.count(-1) > 1:
                raise UnsupportedOp(f"ONNX op Reshape: target shape {target} has more than one -1")
            if -1 in rest:
                known = int(np.prod([d for d in rest if d != -1]))
                rest[rest.index(-1)] = int(np.prod(shapes[x])) // known
            if int(np.prod(rest)) != int(np.prod(shapes[x])):
                raise ConversionError(f"Reshape {target} does not fit input [N, {shapes[x]}]")
            layer = Layer("reshape", x, node.output[0], shape=tuple(rest))
            layers.append(layer)
            shapes[layer.out] = layer.shape
        elif op == "Gemm":
            x = activation(node, node.input[0])
            if int(a.get("transA", 0)):
                raise UnsupportedOp("ONNX op Gemm: transA=1 is not supported")
            b = const(node, node.input[1])
            w = b if int(a.get("transB", 0)) else b.T
            w = w * float(a.get("alpha", 1.0))
            c = const(node, node.input[2]) * float(a.get("beta", 1.0)) if len(node.input) > 2 and node.input[2] else None
            add_fc(node, x, w, c)
        elif op == "MatMul":
            x = activation(node, node.input[0])
            b = const(node, node.input[1])
            if b.ndim != 2:
                raise UnsupportedOp("ONNX op MatMul: only a constant 2-D right-hand side is supported")
            add_fc(node, x, b.T, None)
        elif op == "Add":
            left, right = real(node.input[0]), real(node.input[1])
            x, bias = (left, right) if right in consts else (right, left)
            layer = fusable(x)
            if bias not in consts or layer is None or layer.bias is not None or layer.relu:
                raise UnsupportedOp(
                    "ONNX op Add is only supported as a constant bias directly after MatMul/Gemm"
                )
            layer.bias = np.broadcast_to(consts[bias].reshape(-1), (layer.weight.shape[0],)).astype(np.float32).copy()
            del producer[layer.out]
            layer.out = node.output[0]
            producer[layer.out] = layer
            shapes[layer.out] = shapes.pop(x)
        elif op == "Relu":
            x = activation(node, node.input[0])
            layer = fusable(x)
            if layer is not None and not layer.relu:
                layer.relu = True
                del producer[layer.out]
                layer.out = node.output[0]
                producer[layer.out] = layer
                shapes[layer.out] = shapes.pop(x)
            else:
                layers.append(Layer("relu", x, node.output[0]))
                shapes[node.output[0]] = shapes[x]
        else:
            raise UnsupportedOp(
                f"ONNX op {op} (node {node.name or '?'}) is not supported by the TFLite int8 writer; "
                f"supported: {', '.join(SUPPORTED_OPS)}"
            )
    resolved = [real(o) for o in outputs]
    for out, name in zip(outputs, resolved):
        if name not in shapes:
            raise ConversionError(f"output {out} is not computed by a supported op")
        if name == gin.name:
            raise ConversionError(f"output {out} is the model input; nothing to convert")
    graph = Graph(gin.name, input_shape, resolved, layers, shapes)
    graph.output_names = outputs  # type: ignore[attr-defined]  # ONNX names, possibly aliased
    return graph


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

        out_names = graph.output_names  # type: ignore[attr-defined]
        if out_names != graph.outputs:
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
