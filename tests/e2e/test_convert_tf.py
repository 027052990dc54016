"""`edged convert` from Keras and TF SavedModel sources to full-integer TFLite
int8 (TensorFlow's TFLiteConverter), served by the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, start_daemon

pytestmark = pytest.mark.slow
KERAS_DEMO = REPO / "build" / "demo-keras"


def edged(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:  # only a hang reaches it
    return subprocess.run([sys.executable, "-m", "edged.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin",
                                                          "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.fixture(scope="module")
def keras_demo() -> Path:
    pytest.importorskip("tensorflow", reason="needs the convert-tf extra (make test installs it)")
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_keras_demo.py"), "--out", str(KERAS_DEMO)],
                   check=True, cwd=REPO)
    return KERAS_DEMO


@pytest.fixture(scope="module")
def converted(keras_demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles")
    result = edged("convert", keras_demo / "digits_cnn.keras", "--profile", "rpi4", "--name", "digits-cnn",
                   "--calib", keras_demo / "digits_calib.npz", "--holdout", keras_demo / "digits_test.npz", "-o", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "digits-cnn"


def test_keras_cnn_becomes_a_full_integer_tflite_model(converted):
    from ai_edge_litert.interpreter import Interpreter

    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["runtime"] == "tflite" and manifest["inputs"][0]["layout"] == "NHWC"
    interp = Interpreter(model_path=str(converted / "model.tflite"))
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8
    ops = {op["op_name"] for op in interp._get_ops_details()}  # noqa: SLF001 - the only op listing API
    assert "CONV_2D" in ops, ops
    report = json.loads((converted / "report.json").read_text())
    assert report["top1_agreement"] >= 0.99 and report["accuracy_drop_points"] <= 1.0, report


def test_daemon_serves_it_and_agrees_with_keras(converted, keras_demo, tmp_path):
    import tensorflow as tf

    with np.load(keras_demo / "digits_test.npz") as data:
        x, y = data["x"], data["y"]
    keras_top = np.asarray(tf.keras.models.load_model(keras_demo / "digits_cnn.keras")(x)).argmax(1)
    models = tmp_path / "models"
    models.mkdir()
    (models / "digits-cnn").symlink_to(converted)
    daemon = start_daemon(tmp_path / "d", models)
    try:
        status, meta = daemon.get("/v2/models/digits-cnn")
        assert status == 200, meta
        name = meta["inputs"][0]["name"]
        status, body = daemon.post("/v2/models/digits-cnn/infer", {"inputs": [
            {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200, body
        logits = np.asarray(body["outputs"][0]["data"]).reshape(body["outputs"][0]["shape"])
        agreement = float(np.mean(logits.argmax(1) == keras_top))
        assert agreement >= 0.99, agreement
        assert float(np.mean(logits.argmax(1) == y)) > 0.95
    finally:
        daemon.stop()


def test_saved_model_directory_source(keras_demo, tmp_path):
    import tensorflow as tf

    saved = tmp_path / "saved"
    tf.keras.models.load_model(keras_demo / "digits_cnn.keras").export(str(saved))
    result = edged("convert", saved, "--profile", "rpi5", "--name", "digits-sm", "--calib", keras_demo / "digits_calib.npz",
                   "--holdout", keras_demo / "digits_test.npz", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "digits-sm" / "report.json").read_text())
    assert report["top1_agreement"] >= 0.99


def test_all_profiles_writes_tflite_and_explains_the_rest(keras_demo, tmp_path):
    result = edged("convert", keras_demo / "digits_cnn.keras", "--all-profiles", "--name", "cnn",
                   "--calib", keras_demo / "digits_calib.npz", "-o", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "cnn-rpi4" / "model.tflite").exists() and (tmp_path / "cnn-rpi5" / "model.tflite").exists()
    assert not (tmp_path / "cnn-intel-x86").exists()
    assert "Keras/SavedModel sources become TFLite only" in result.stderr


def test_bad_keras_inputs_are_refused(keras_demo, tmp_path):
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a model")
    result = edged("convert", junk, "--profile", "rpi4", "-o", tmp_path / "out")
    assert result.returncode == 2 and "not a loadable Keras model" in result.stderr
    wrong = tmp_path / "nchw.npy"
    np.save(wrong, np.zeros((4, 1, 8, 8), np.float32))
    result = edged("convert", keras_demo / "digits_cnn.keras", "--profile", "rpi4", "--calib", wrong, "-o", tmp_path / "out")
    assert result.returncode == 2 and "shape" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
