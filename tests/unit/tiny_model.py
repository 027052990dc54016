"""A tiny real ONNX model and bundle for unit tests (no demo build needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edged.bundle import Bundle, Manifest, write_bundle
from edged.tensors import TensorSpec

WEIGHTS = np.random.RandomState(0).randn(4, 3).astype(np.float32)


def write_tiny_bundle(dest: Path, name: str = "tiny", version: str = "1.0.0", *,
                      tolerance: dict[str, float] | None = None, samples_off_by: float = 0.0) -> Bundle:
    """``samples_off_by``: one expected output in samples.npz is moved by that fraction
    of the outputs' peak |value| (as another CPU's kernels could give)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["y"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(WEIGHTS, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = dest.parent / f".{dest.name}-model.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(source))
    x = np.random.RandomState(1).rand(2, 4).astype(np.float32)
    manifest = Manifest(
        name=name, version=version, runtime="onnx", model_file="model.onnx",
        inputs=[TensorSpec("input", "float32", (-1, 4), "NC")],
        outputs=[TensorSpec("y", "float32", (-1, 3), "NC")],
    )
    if tolerance is not None:
        manifest.tolerance = tolerance
    expected = x @ WEIGHTS
    expected[0, 0] += samples_off_by * float(np.abs(expected).max())
    bundle = write_bundle(dest, manifest, {"model.onnx": source}, {"input": x}, {"y": expected})
    source.unlink()
    return bundle
