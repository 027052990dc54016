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


# These tests are about the onnx2torch route: the onnx2tf venv, tried first when it is
# there (tests/e2e/test_convert_onnx_tf.py covers it), is hidden from them.
NO_ONNX2TF = {"EDGED_TF_VENV": str(REPO / "build" / "no-tf-venv-for-these-tests")}


def torch_venv(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:  # only a hang reaches it
    env = {**os.environ, "COLUMNS": "200", "TF_CPP_MIN_LOG_LEVEL": "2", **NO_ONNX2TF}
    return subprocess.run([str(TORCH_VENV / "bin" / "python"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


def convert_rpi4(source: Path, name: str, out: Path) -> Path:
    """`edged convert SOURCE --profile rpi4` in build/torch-venv on the demo data."""
    result = torch_venv("-m", "edged.cli", "convert", source, "--profile", "rpi4", "--name", name,
                        "--calib", DEMO / "digits_calib.npz", "--holdout", DEMO / "digits_test.npz", "-o", out)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return out / name


def int8_cnn_checks(bundle: Path) -> tuple[dict, object]:
    """Checks both CNN bundles share: TFLite, NCHW batch 1, int8 kernels and input,
    top-1 agreement >= 99% with the source and <= 1 point lost. Returns (manifest, interpreter)."""
    from ai_edge_litert.interpreter import Interpreter

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["runtime"] == "tflite" and manifest["provenance"]["converter"] == "tflite-torch"
    assert manifest["inputs"][0]["shape"] == [1, 1, 8, 8] and manifest["inputs"][0]["layout"] == "NCHW"
    interp = Interpreter(model_path=str(bundle / "model.tflite"))
    interp.allocate_tensors()
    ops = {op["op_name"] for op in interp._get_ops_details()}  # noqa: SLF001 - the only op listing API
    assert "CONV_2D" in ops and "DEQUANTIZE" not in ops, ops  # int8 kernels, not float weights behind dequantize
    assert interp.get_input_details()[0]["dtype"] == np.int8
    report = json.loads((bundle / "report.json").read_text())
    assert report["top1_agreement"] >= 0.99, report  # against the source model (PyTorch, or onnxruntime for ONNX)
    assert report["accuracy_drop_points"] <= 1.0, report
    return manifest, interp


def serve_digits(bundle: Path, name: str, tmp_path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """Serve ``bundle`` from a real daemon and send the whole held-out set as one batch.
    Returns (model metadata, logits, labels)."""
    with np.load(DEMO / "digits_test.npz") as data:
        x, y = data["x"], data["y"]
    models = tmp_path / "models"
    models.mkdir()
    (models / name).symlink_to(bundle)
    daemon = start_daemon(tmp_path / "d", models)
    try:
        status, meta = daemon.get(f"/v2/models/{name}")
        assert status == 200, meta
        status, body = daemon.post(f"/v2/models/{name}/infer", {"inputs": [
            {"name": meta["inputs"][0]["name"], "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200, body
        return meta, np.asarray(body["outputs"][0]["data"]).reshape(body["outputs"][0]["shape"]), y
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    if not (TORCH_VENV / "bin" / "edged").exists():
        pytest.skip("build/torch-venv is missing: `make test` (or `make install-torch`) creates it")
    result = torch_venv("scripts/build_torch_demo.py", "--out", DEMO)
    assert result.returncode == 0, result.stderr
    return convert_rpi4(DEMO / "digits_cnn.pt2", "digits-torch", tmp_path_factory.mktemp("bundles"))


def test_pytorch_cnn_becomes_an_int8_tflite_model(converted):
    manifest, interp = int8_cnn_checks(converted)
    assert manifest["inputs"][0]["dtype"] == "int8" and manifest["inputs"][0]["quantization"]["scale"] > 0
    conv_weights = [t for t in interp.get_tensor_details() if t["dtype"] == np.int8 and len(t["shape"]) == 4]
    assert conv_weights, "no int8 convolution weights"


def test_daemon_serves_the_batch_one_model_for_any_batch(converted, tmp_path):
    _, logits, y = serve_digits(converted, "digits-torch", tmp_path)
    assert logits.shape == (len(y), 10)
    assert float(np.mean(logits.argmax(1) == y)) > 0.97


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
    return convert_rpi4(DEMO / "digits_cnn.onnx", "digits-onnx-cnn", tmp_path_factory.mktemp("onnx-bundles"))


def test_onnx_cnn_becomes_an_int8_tflite_model_through_onnx2torch(converted_onnx):
    manifest, interp = int8_cnn_checks(converted_onnx)
    assert manifest["provenance"]["onnx2torch"], manifest["provenance"]
    assert interp.get_output_details()[0]["dtype"] == np.int8


def test_daemon_serves_the_onnx_cnn_as_tflite(converted_onnx, tmp_path):
    meta, logits, y = serve_digits(converted_onnx, "digits-onnx-cnn", tmp_path)
    assert meta["platform"] == "tensorflow_lite", meta
    assert float(np.mean(logits.argmax(1) == y)) > 0.97


def test_onnx_cnn_without_the_torch_extra_names_it(converted_onnx, tmp_path):
    """.venv has no torch: the MLP writer refuses Conv and says which extra converts it."""
    result = subprocess.run([sys.executable, "-m", "edged.cli", "convert", str(DEMO / "digits_cnn.onnx"),
                             "--profile", "rpi4", "--calib", str(DEMO / "digits_calib.npz"), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "COLUMNS": "400", **NO_ONNX2TF})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Conv" in result.stderr and "edged[convert-torch]" in result.stderr, result.stderr
    assert not (tmp_path / "out" / "digits_cnn").exists()
