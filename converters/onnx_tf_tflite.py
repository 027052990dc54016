"""The TFLite side of the onnx2tf route, run inside build/tf-venv by
``onnx_tf_worker.py``: int8 quantization of the wrapped SavedModel with
TensorFlow's converter, its fp16 and fp32 TFLite twins (the accuracy fallback
and the same-runtime fp32 baseline), the ONNX names and order for the TFLite inputs and
outputs, and what the result contains."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np


class QuantizeError(Exception):
    """TensorFlow's converter could not quantize; ``op_type`` names the TFLite op when known."""

    def __init__(self, message: str, op_type: str = "") -> None:
        super().__init__(message)
        self.op_type = op_type


def save_wrapped(wrapper: Any, work: Path) -> Path:
    """The wrapped model (ONNX layouts, in_i/out_i signature) as a SavedModel folder."""
    import tensorflow as tf

    saved = work / "wrapped"
    shutil.rmtree(saved, ignore_errors=True)
    tf.saved_model.save(wrapper, str(saved), signatures={"serving_default": wrapper.serve.get_concrete_function()})
    return saved


def float_tflite(saved: Path, precision: str) -> bytes:
    """A float TFLite of the wrapped SavedModel: fp32, or fp16 weights (float
    I/O; the runtime computes in fp32 after dequantizing the weights)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def quantize(saved: Path, samples: list[dict[str, np.ndarray]], names: list[str],
             per_channel: bool, log_path: Path) -> tuple[bytes, str]:
    """Full-integer int8 TFLite bytes of the wrapped SavedModel and the I/O mode ("int8" or "float")."""
    import tensorflow as tf

    def dataset():
        for s in samples:
            yield {f"in_{i}": s[n] for i, n in enumerate(names)}

    errors = []
    for io in ("int8", "float"):
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if not per_channel:
            converter._experimental_disable_per_channel = True  # noqa: SLF001 - the converter's only switch
        if io == "int8":
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        try:
            return converter.convert(), io
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            with open(log_path, "a") as f:
                f.write(f"\n===== TFLiteConverter io={io}\n{text}\n")
            errors.append(text)
    text = errors[-1]
    ops = re.findall(r"'tfl\.([a-z_0-9]+)'", text) or re.findall(r"'tf\.([A-Za-z0-9_]+)'", text)
    first = next((ln for ln in text.splitlines() if "error" in ln.lower()), text.splitlines()[0] if text else "")
    raise QuantizeError(f"TFLite int8 quantization failed: {first[:400]}", ("tfl." + ops[0]) if ops else "")


def rename_io(model_bytes: bytes, in_names: list[str], out_names: list[str]) -> bytes:
    """Give the TFLite inputs/outputs the ONNX names and order, via the signature's in_i/out_i keys."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    sub = model.subgraphs[0]
    sig = model.signatureDefs[0]
    by_key = {m.name.decode() if isinstance(m.name, bytes) else m.name: m for m in list(sig.inputs) + list(sig.outputs)}
    order_in, order_out = [], []
    for prefix, names, order in (("in", in_names, order_in), ("out", out_names, order_out)):
        for i, name in enumerate(names):
            tm = by_key[f"{prefix}_{i}"]
            sub.tensors[tm.tensorIndex].name = name.encode()
            tm.name = name.encode()
            order.append(tm.tensorIndex)
    sub.inputs = np.asarray(order_in, dtype=np.int32)
    sub.outputs = np.asarray(order_out, dtype=np.int32)
    sig.inputs = [next(m for m in sig.inputs if m.tensorIndex == t) for t in order_in]
    sig.outputs = [next(m for m in sig.outputs if m.tensorIndex == t) for t in order_out]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def inspect_tflite(path: Path) -> dict[str, Any]:
    """Ops, I/O and which ops still compute in float (the converter keeps an op
    in float, between DEQUANTIZE and QUANTIZE, when it has no int8 kernel)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_path=str(path),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    op_details = interp._get_ops_details()  # noqa: SLF001 - the only op listing
    float_ops = sorted({op["op_name"] for op in op_details if op["op_name"] != "DEQUANTIZE" and any(
        i in tensors and np.dtype(tensors[i]["dtype"]) == np.float32 for i in op["outputs"])})

    def io(d: dict) -> dict:
        scale, zero = d["quantization"]
        return {"name": d["name"], "shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "scale": float(scale), "zero_point": int(zero)}

    return {"ops": sorted({op["op_name"] for op in op_details}), "float_ops": float_ops,
            "float_tensors": sum(1 for d in tensors.values() if np.dtype(d["dtype"]) == np.float32),
            "int8_tensors": sum(1 for d in tensors.values() if np.dtype(d["dtype"]) == np.int8),
            "inputs": [io(d) for d in interp.get_input_details()], "outputs": [io(d) for d in interp.get_output_details()]}
