"""A ready .tflite with a dynamic [-1, -1] input (openWakeWord's mel front-end,
from its pip wheel): the TFLite runtime cannot re-prepare it once allocated at
its placeholder shape [1, 1], so it allocates at the first real shape. It must
load, run any length, agree with the same model's .onnx, and wrap as a bundle."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from edged.bundle import open_bundle
from edged.model import LoadedModel
from edged.runtimes import RuntimeOptions, create_runtime
from tests.corpus import models


def _speech_like(n: int) -> np.ndarray:
    data = models.get("oww_melspec").make_data(1, 0)
    audio = next(iter(data.values())).reshape(-1)
    return np.resize(audio, n).reshape(1, n).astype(np.float32)


def test_dynamic_input_tflite_runs_any_length_like_its_onnx_twin():
    import onnxruntime as ort

    tflite = create_runtime("tflite")
    tflite.load(str(models.get("oww_melspec_tflite").path()), RuntimeOptions())
    onnx = ort.InferenceSession(str(models.get("oww_melspec").path()), providers=["CPUExecutionProvider"])
    try:
        (spec,) = tflite.inputs
        assert spec.shape == (-1, -1)
        for n in (16000, 1280, 32000):  # grow, shrink, grow: each shape re-prepared
            audio = _speech_like(n)
            got = next(iter(tflite.infer({spec.name: audio}).values()))
            want = onnx.run(None, {onnx.get_inputs()[0].name: audio})[0]
            assert got.shape == want.shape  # frames follow the length
            assert np.allclose(got, want, atol=1e-3 * float(np.ptp(want)) + 1e-4), float(np.abs(got - want).max())
    finally:
        tflite.unload()


def test_bundle_create_wraps_it(tmp_path):
    model = models.get("oww_melspec_tflite").path()
    proc = subprocess.run([sys.executable, "-m", "edged.cli", "bundle", "create", str(model), "--name", "melspec",
                           "--input-shape", "serving_default_input:0=1,16000", "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bundle = open_bundle(tmp_path / "melspec")
    loaded = LoadedModel.load(bundle, RuntimeOptions(), warmup=1)
    try:
        assert loaded.self_test() <= 1.0
    finally:
        loaded.unload()
