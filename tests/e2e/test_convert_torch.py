"""`edged convert` from a PyTorch torch.export archive (.pt2) to int8 TFLite with
litert-torch. The converter runs from build/torch-venv (`make test` creates it:
litert-torch is several GB, so it stays out of .venv); the daemon serving the
result runs from .venv like on a device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, start_daemon

pytestmark = pytest.mark.slow
TORCH_VENV = REPO / "build" / "torch-venv"
DEMO = REPO / "build" / "demo-torch"


def torch_venv(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([str(TORCH_VENV / "bin" / "python"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    if not (TORCH_VENV / "bin" / "edged").exists():
        pytest.skip("build/torch-venv is missing: `make test` (or `make install-torch`) creates it")
    result = torch_venv("scripts/build_torch_demo.py", "--out", DEMO)
    assert result.returncode == 0, result.stderr
    out = tmp_path_factory.mktemp("bundles")
    result = torch_venv("-m", "edged.cli", "convert", DEMO / "digits_cnn.pt2", "--profile", "rpi4",
                        "--name", "digits-torch", "--calib", DEMO / "digits_calib.npz",
                        "--holdout", DEMO / "digits_test.npz", "-o", out)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return out / "digits-torch"


def test_pytorch_cnn_becomes_an_int8_tflite_model(converted):
    from ai_edge_litert.interpreter import Interpreter

    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["runtime"] == "tflite" and manifest["provenance"]["converter"] == "tflite-torch"
    assert manifest["inputs"][0]["shape"] == [1, 1, 8, 8] and manifest["inputs"][0]["layout"] == "NCHW"
    interp = Interpreter(model_path=str(converted / "model.tflite"))
    interp.allocate_tensors()
    ops = {op["op_name"] for op in interp._get_ops_details()}  # noqa: SLF001 - the only op listing API
    assert "CONV_2D" in ops and "DEQUANTIZE" not in ops, ops  # int8 kernels, not float weights behind dequantize
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert manifest["inputs"][0]["dtype"] == "int8" and manifest["inputs"][0]["quantization"]["scale"] > 0
    conv_weights = [t for t in interp.get_tensor_details() if t["dtype"] == np.int8 and len(t["shape"]) == 4]
    assert conv_weights, "no int8 convolution weights"
    report = json.loads((converted / "report.json").read_text())
    assert report["top1_agreement"] >= 0.99, report  # against the PyTorch model itself
    assert report["accuracy_drop_points"] <= 1.0, report


def test_daemon_serves_the_batch_one_model_for_any_batch(converted, tmp_path):
    with np.load(DEMO / "digits_test.npz") as data:
        x, y = data["x"], data["y"]
    models = tmp_path / "models"
    models.mkdir()
    (models / "digits-torch").symlink_to(converted)
    daemon = start_daemon(tmp_path / "d", models)
    try:
        status, meta = daemon.get("/v2/models/digits-torch")
        name = meta["inputs"][0]["name"]
        status, body = daemon.post("/v2/models/digits-torch/infer", {"inputs": [
            {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200, body
        logits = np.asarray(body["outputs"][0]["data"]).reshape(body["outputs"][0]["shape"])
        assert logits.shape == (len(x), 10)
        assert float(np.mean(logits.argmax(1) == y)) > 0.97
    finally:
        daemon.stop()


def test_not_a_pt2_archive_is_refused(tmp_path):
    if not (TORCH_VENV / "bin" / "edged").exists():
        pytest.skip("build/torch-venv is missing: `make test` (or `make install-torch`) creates it")
    junk = tmp_path / "model.pt2"
    junk.write_bytes(b"not a zip")
    result = torch_venv("-m", "edged.cli", "convert", junk, "--profile", "rpi4", "-o", tmp_path / "out")
    assert result.returncode == 2 and "not a torch.export program" in result.stderr, result.stderr[-2000:]


# ------------------------------------------------- ONNX CNN -> TFLite via onnx2torch


@pytest.fixture(scope="module")
def converted_onnx(converted, tmp_path_factory) -> Path:
    """The same CNN exported to ONNX (build_torch_demo.py writes both), converted for rpi4."""
    out = tmp_path_factory.mktemp("onnx-bundles")
    result = torch_venv("-m", "edged.cli", "convert", DEMO / "digits_cnn.onnx", "--profile", "rpi4",
                        "--name", "digits-onnx-cnn", "--calib", DEMO / "digits_calib.npz",
                        "--holdout", DEMO / "digits_test.npz", "-o", out)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return out / "digits-onnx-cnn"


def test_onnx_cnn_becomes_an_int8_tflite_model_through_onnx2torch(converted_onnx):
    from ai_edge_litert.interpreter import Interpreter

    manifest = json.loads((converted_onnx / "manifest.json").read_text())
    assert manifest["runtime"] == "tflite" and manifest["provenance"]["converter"] == "tflite-torch"
    assert manifest["provenance"]["onnx2torch"], manifest["provenance"]
    assert manifest["inputs"][0]["shape"] == [1, 1, 8, 8] and manifest["inputs"][0]["layout"] == "NCHW"
    interp = Interpreter(model_path=str(converted_onnx / "model.tflite"))
    interp.allocate_tensors()
    ops = {op["op_name"] for op in interp._get_ops_details()}  # noqa: SLF001 - the only op listing API
    assert "CONV_2D" in ops and "DEQUANTIZE" not in ops, ops
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8
    report = json.loads((converted_onnx / "report.json").read_text())
    assert report["top1_agreement"] >= 0.99, report  # against onnxruntime on the ONNX source
    assert report["accuracy_drop_points"] <= 1.0, report


def test_daemon_serves_the_onnx_cnn_as_tflite(converted_onnx, tmp_path):
    with np.load(DEMO / "digits_test.npz") as data:
        x, y = data["x"], data["y"]
    models = tmp_path / "models"
    models.mkdir()
    (models / "digits-onnx-cnn").symlink_to(converted_onnx)
    daemon = start_daemon(tmp_path / "d", models)
    try:
        status, meta = daemon.get("/v2/models/digits-onnx-cnn")
        assert status == 200 and meta["platform"] == "tensorflow_lite", meta
        name = meta["inputs"][0]["name"]
        status, body = daemon.post("/v2/models/digits-onnx-cnn/infer", {"inputs": [
            {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200, body
        logits = np.asarray(body["outputs"][0]["data"]).reshape(body["outputs"][0]["shape"])
        assert float(np.mean(logits.argmax(1) == y)) > 0.97
    finally:
        daemon.stop()


def test_onnx_cnn_without_the_torch_extra_names_it(converted_onnx, tmp_path):
    """.venv has no torch: the MLP writer refuses Conv and says which extra converts it."""
    result = subprocess.run([sys.executable, "-m", "edged.cli", "convert", str(DEMO / "digits_cnn.onnx"),
                             "--profile", "rpi4", "--calib", str(DEMO / "digits_calib.npz"), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Conv" in result.stderr and "edged[convert-torch]" in result.stderr, result.stderr
    assert not (tmp_path / "out" / "digits_cnn").exists()
