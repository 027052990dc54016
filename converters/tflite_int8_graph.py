"""The ONNX subset the TensorFlow-free int8 TFLite writer (``tflite_int8``)
takes, read into a list of layers with a float reference forward pass.

Supported (anything else raises ``UnsupportedOp`` naming the op):

* ``Flatten`` (axis=1) and ``Reshape`` with a constant shape that keeps the
  batch dimension (``0`` or ``-1`` first) -> a reshape layer
* ``Gemm`` (transA=0, any transB/alpha/beta, constant B and C) and ``MatMul``
  with a constant 2-D right-hand side, optionally followed by ``Add`` of a
  constant bias -> a fully-connected layer
* ``Relu`` -> fused into the preceding fully-connected layer, or a relu layer
* ``Identity``, ``Dropout`` (inference no-ops), ``Constant``

One float32 input whose first dimension is the batch, followed by static
dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converters.errors import ConversionError, UnsupportedOp

SUPPORTED_OPS = ("Flatten", "Reshape", "Gemm", "MatMul", "Add", "Relu", "Identity", "Dropout", "Constant")


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
    output_names: list[str] = field(default_factory=list)  # the ONNX outputs as named, possibly aliases

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
    return Graph(gin.name, input_shape, resolved, layers, shapes, outputs)

