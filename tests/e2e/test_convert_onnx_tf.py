"""The onnx2tf route (converters/onnx_tf.py): ONNX -> full-integer int8 TFLite in
build/tf-venv, checked here with .venv's onnxruntime and LiteRT interpreter as
the daemon would run it. A real model (PaddleOCR's text-orientation classifier
from the rapidocr wheel, on rendered text lines) and a small graph with
SpaceToDepth and a Clip whose bounds are computed from the input (what
onnx2torch could not take)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters import onnx_tf
from converters.base import ConversionError, ConverterUnavailable

pytestmark = pytest.mark.slow
COSINE_MIN = 0.98


def need_venv() -> None:
    if not onnx_tf.available():
        pytest.skip(f"{onnx_tf.venv_dir()} is missing: `make install-tf` creates it (onnx2tf, TensorFlow; Python >= 3.12)")


def text_images(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` crops of rendered text pages, rapidocr's normalization, NCHW [n, 3, size, size]."""
    from tests.corpus import images

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        page = images.page(rng, 4 * size).astype(np.float32)
        y, x = rng.integers(0, 3 * size, 2)
        crop = page[y:y + size, x:x + size]
        out.append(((crop / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out)


def s2d_clip_model(path: Path) -> Path:
    """Conv -> SpaceToDepth -> Conv -> Clip(min=-m, max=m) with m = 0.5 * max|x| computed
    in the graph (Clip bounds as tensors, not constants)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.2, (16, 32, 1, 1)).astype(np.float32), "w2")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    graph = helper.make_graph([
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("SpaceToDepth", ["r1"], ["s"], blocksize=2),
        helper.make_node("Conv", ["s", "w2"], ["c2"]),
        helper.make_node("Abs", ["x"], ["ax"]),
        helper.make_node("ReduceMax", ["ax"], ["mx"], keepdims=0),
        helper.make_node("Mul", ["mx", "half"], ["hi"]),
        helper.make_node("Neg", ["hi"], ["lo"]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["y"]),
    ], "s2d_clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], [w1, w2, half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def compare(source: Path, tflite: Path, feeds: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Run every sample (rank r+1 arrays) through onnxruntime and the int8 model;
    per output: mean cosine, and the int8 model's I/O details."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    interp = Interpreter(model_path=str(tflite))
    interp.allocate_tensors()
    ins, outs = interp.get_input_details(), interp.get_output_details()
    assert [d["name"] for d in ins] == [i.name for i in session.get_inputs()]
    assert [d["name"] for d in outs] == [o.name for o in session.get_outputs()]
    n = len(next(iter(feeds.values())))
    cosines: dict[str, list[float]] = {}
    for i in range(n):
        feed = {k: v[i] for k, v in feeds.items()}
        ref = session.run(None, feed)
        for d in ins:
            x = feed[d["name"]]
            assert list(d["shape"]) == list(x.shape), (d["name"], d["shape"], x.shape)  # ONNX layout kept
            scale, zero = d["quantization"]
            if d["dtype"] == np.int8:
                x = np.clip(np.round(x / scale + zero), -128, 127)
            interp.set_tensor(d["index"], x.astype(d["dtype"]))
        interp.invoke()
        for d, r in zip(outs, ref):
            y = interp.get_tensor(d["index"])
            assert y.shape == r.shape, (d["name"], y.shape, r.shape)
            scale, zero = d["quantization"]
            if d["dtype"] == np.int8:
                y = (y.astype(np.float32) - zero) * scale
            a, b = r.astype(np.float64).ravel(), y.astype(np.float64).ravel()
            cosines.setdefault(d["name"], []).append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return {k: {"cosine": float(np.mean(v))} for k, v in cosines.items()}


def assert_int8(result: onnx_tf.OnnxTFResult, kernel: str) -> None:
    details = result.details
    assert result.io == "int8", details
    assert all(d["dtype"] == "int8" for d in details["inputs"] + details["outputs"]), details
    assert kernel in details["ops"], details["ops"]
    assert details["int8_tensors"] > 0 and kernel not in details["float_ops"], details


def test_s2d_clip_graph(tmp_path):
    need_venv()
    source = s2d_clip_model(tmp_path / "s2d_clip.onnx")
    calib = text_images(24, 32, seed=1)  # rank r: samples along the batch dim
    result = onnx_tf.convert(source, {"x": calib}, tmp_path / "work", cache_dir=tmp_path / "cache")
    assert_int8(result, "CONV_2D")
    assert "SPACE_TO_DEPTH" in result.details["ops"]
    assert result.calibration_samples == 24
    held_out = text_images(12, 32, seed=2)[:, None]  # rank r+1: one full input per sample
    metrics = compare(source, result.tflite, {"x": held_out})
    assert metrics["y"]["cosine"] >= COSINE_MIN, metrics


def test_ppocr_cls(tmp_path):
    need_venv()
    from tests.corpus.fetch import CorpusError
    from tests.corpus.models import get

    model = get("ppocr_cls")
    try:
        source = model.path()
    except CorpusError as exc:
        pytest.skip(f"corpus model unavailable: {exc}")
    calib = model.make_data(32, seed=0, model_path=source)
    result = onnx_tf.convert(source, {"x": calib["x"]}, tmp_path / "work", cache_dir=tmp_path / "cache")
    assert_int8(result, "CONV_2D")
    assert result.details["inputs"][0]["shape"] == [1, 3, 48, 192]  # NCHW kept
    held_out = model.make_data(16, seed=10_000, model_path=source)
    metrics = compare(source, result.tflite, {"x": held_out["x"][:, None]})
    assert metrics["save_infer_model/scale_0.tmp_1"]["cosine"] >= COSINE_MIN, metrics


def test_without_venv_names_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGED_TF_VENV", str(tmp_path / "no-venv"))
    assert not onnx_tf.available()
    with pytest.raises(ConverterUnavailable, match="make install-tf"):
        onnx_tf.onnx_to_tflite_int8(tmp_path / "m.onnx", {"x": np.zeros((1, 4), np.float32)}, tmp_path / "w")


def test_bad_calibration_is_named(tmp_path):
    need_venv()
    source = s2d_clip_model(tmp_path / "s2d_clip.onnx")
    with pytest.raises(ConversionError, match=r"input 'x': dim 2 is 32 in the model, 16"):
        onnx_tf.convert(source, {"x": np.zeros((4, 3, 16, 16), np.float32)}, tmp_path / "w")
    with pytest.raises(ConversionError, match="no array for input 'x'"):
        onnx_tf.convert(source, {"image": np.zeros((4, 3, 32, 32), np.float32)}, tmp_path / "w")


def test_unsupported_operator_is_named(tmp_path):
    need_venv()
    import onnx
    from onnx import TensorProto, helper

    from converters.base import UnsupportedOp

    graph = helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")], "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "custom.onnx"))
    with pytest.raises(UnsupportedOp, match=r"operator com\.example:FancyOp.*edged bundle create"):
        onnx_tf.convert(tmp_path / "custom.onnx", {"x": np.ones((4, 4), np.float32)}, tmp_path / "w")
