"""Real conversions (no mocks): the demo digits model through all three converters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.base import BundleInfo, ConversionError, ConverterUnavailable, UnsupportedOp, require
from edged.bundle import open_bundle
from edged.model import LoadedModel
from edged.runtimes import RuntimeOptions
from tests.helpers import REPO

BUNDLES = ("digits-onnx", "digits-tflite", "digits-openvino")


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """Build the demo once into a temp dir with the real script."""
    root = tmp_path_factory.mktemp("converters")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_demo.py"), "--out", str(root / "demo-bundles"), "--force"],
        check=True, cwd=REPO, stdout=subprocess.DEVNULL,
    )
    return root


@pytest.fixture(scope="session")
def test_set(demo) -> tuple[np.ndarray, np.ndarray]:
    with np.load(demo / "demo-data" / "digits_test.npz") as data:
        return data["x"], data["y"]


def _fp32(source: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


@pytest.fixture(scope="session")
def fp32_top1(demo, test_set) -> np.ndarray:
    return _fp32(demo / "demo-data" / "digits_fp32.onnx", test_set[0]).argmax(axis=1)


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_loads_and_agrees_with_fp32(demo, test_set, fp32_top1, name):
    bundle = open_bundle(demo / "demo-bundles" / name)  # verifies every hash
    m = bundle.manifest
    assert m.name == name and m.version == "1.0.0" and m.labels == [str(i) for i in range(10)]
    model = LoadedModel.load(bundle, RuntimeOptions())
    try:
        assert model.self_test() <= 1.0
        x, y = test_set
        logits = model.infer({"input": x})["logits"]
        assert logits.dtype == np.float32 and logits.shape == (len(x), 10)
        agreement = float(np.mean(logits.argmax(axis=1) == fp32_top1))
        assert agreement >= 0.99, f"{name}: top-1 agreement {agreement:.4f}"
        assert float(np.mean(logits.argmax(axis=1) == y)) >= 0.9
        for batch in (1, 4):
            assert model.infer({"input": x[:batch]})["logits"].shape == (batch, 10)
    finally:
        model.unload()
    v = m.validation
    assert v["top1_agreement"] >= 0.99 and v["samples"] == len(test_set[0])
    assert {"accuracy_fp32", "accuracy_converted"} <= set(v)
    assert m.provenance["converter"] and m.provenance["source_sha256"] and m.provenance["tools"]
    if m.provenance.get("precision") == "int8":  # another CPU's int8 kernels must not fail the self-test
        assert m.tolerance["peak_fraction"] == 0.2 and m.tolerance["atol"] >= 2 * v["max_abs_error_samples"]
    assert [t.layout for t in m.inputs] == ["NCHW"] and [t.layout for t in m.outputs] == ["NC"]
    samples, expected = bundle.load_samples()
    assert samples["input"].dtype == np.float32 and len(samples["input"]) == 8
    np.testing.assert_allclose(expected["logits"], _fp32(demo / "demo-data" / "digits_fp32.onnx", samples["input"]), atol=1e-4)


def test_tflite_tensors_are_int8_with_dynamic_batch(demo):
    from ai_edge_litert.interpreter import Interpreter

    bundle = open_bundle(demo / "demo-bundles" / "digits-tflite")
    interp = Interpreter(model_path=str(bundle.model_path))
    interp.allocate_tensors()
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    assert list(inp["shape_signature"]) == [-1, 1, 8, 8] and list(out["shape_signature"]) == [-1, 10]
    spec_in, spec_out = bundle.manifest.inputs[0], bundle.manifest.outputs[0]
    assert spec_in.dtype == "int8" and spec_out.dtype == "int8"
    assert inp["quantization"] == pytest.approx((spec_in.quantization.scale, spec_in.quantization.zero_point))
    assert out["quantization"] == pytest.approx((spec_out.quantization.scale, spec_out.quantization.zero_point))
    weights = [t for t in interp.get_tensor_details() if t["name"].endswith("/weights")]
    assert weights and all(t["dtype"] == np.int8 for t in weights)
    interp.resize_tensor_input(inp["index"], [4, 1, 8, 8])
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], np.zeros((4, 1, 8, 8), np.int8))
    interp.invoke()
    assert interp.get_tensor(interp.get_output_details()[0]["index"]).shape == (4, 10)


def test_float_bundles_take_float32(demo):
    for name in ("digits-onnx", "digits-openvino"):
        spec = open_bundle(demo / "demo-bundles" / name).manifest.inputs[0]
        assert spec.dtype == "float32" and spec.quantization is None and spec.shape == (-1, 1, 8, 8)


def test_onnx_qdq_has_quantize_dequantize_nodes(demo):
    import onnx

    model = onnx.load(str(demo / "demo-bundles" / "digits-onnx" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def _onnx(path: Path, nodes, inits, in_shape, out_name, out_shape) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_tflite_matmul_add_reshape_and_standalone_relu(tmp_path):
    """The rest of the TFLite subset: Reshape with a constant shape, a Relu
    that cannot be fused (it follows a Reshape: a RELU op), MatMul + Add bias."""
    from onnx import helper

    from converters.tflite_int8 import TFLiteInt8Converter

    rng = np.random.RandomState(0)
    w = rng.randn(12, 5).astype(np.float32)
    b = rng.randn(5).astype(np.float32)
    source = _onnx(
        tmp_path / "m.onnx",
        [
            helper.make_node("Reshape", ["input", "shape"], ["r"]),
            helper.make_node("Relu", ["r"], ["rr"]),
            helper.make_node("MatMul", ["rr", "w"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["y"]),
        ],
        {"shape": np.array([0, -1], np.int64), "w": w, "b": b},
        ["N", 3, 4], "y", ["N", 5],
    )
    x = rng.randn(64, 3, 4).astype(np.float32)
    bundle = TFLiteInt8Converter().convert(source, None, x, dest=tmp_path / "out", info=BundleInfo(name="t"))
    assert bundle.manifest.inputs[0].layout == "NCW" and bundle.manifest.outputs[0].dtype == "int8"
    model = LoadedModel.load(open_bundle(bundle.root), RuntimeOptions())
    try:
        assert model.self_test() <= 1.0
        want = np.maximum(x.reshape(64, 12), 0) @ w + b
        got = model.infer({"input": x})["y"]
        assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.95
        assert np.max(np.abs(got - want)) < 0.1 * np.abs(want).max()
    finally:
        model.unload()


def test_tflite_unsupported_op_is_named(tmp_path):
    from onnx import helper

    from converters.tflite_int8 import TFLiteInt8Converter

    source = _onnx(
        tmp_path / "sig.onnx",
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("Sigmoid", ["f"], ["y"])],
        {}, ["N", 4], "y", ["N", 4],
    )
    with pytest.raises(UnsupportedOp, match="Sigmoid") as info:
        TFLiteInt8Converter().convert(source, None, np.zeros((4, 4), np.float32), dest=tmp_path / "o", info=BundleInfo(name="t"))
    assert info.value.code == "unsupported_op" and "supported:" in str(info.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("runtime", ["onnx", "openvino", "tflite"])
def test_non_model_file_is_refused(tmp_path, runtime):
    from converters import get_converter

    source = tmp_path / "model.onnx"
    source.write_bytes(b"this is not a model\x00\xff" * 10)
    with pytest.raises(ConversionError, match="not an ONNX model"):
        get_converter(runtime).convert(
            source, None, np.zeros((4, 1, 8, 8), np.float32), dest=tmp_path / "o", info=BundleInfo(name="t")
        )
    assert not (tmp_path / "o").exists()


def test_missing_tool_names_the_extra():
    with pytest.raises(ConverterUnavailable, match=r"edged\[convert-tflite\]") as info:
        require("no_such_converter_lib", "convert-tflite", "the TFLite converter")
    assert info.value.code == "converter_unavailable"
