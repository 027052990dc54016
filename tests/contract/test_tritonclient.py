"""tritonclient.http, unchanged, against a real `edged serve` subprocess."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.helpers import DEMO_MODELS, start_daemon


@pytest.fixture(scope="module")
def daemon(demo_bundles, tmp_path_factory):
    proc = start_daemon(tmp_path_factory.mktemp("triton"), demo_bundles)
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture(scope="module")
def client(daemon):
    return triton.InferenceServerClient(f"127.0.0.1:{daemon.port}")


def samples(demo_bundles, model):
    """The bundle's sample inputs and the fp32 source model's outputs."""
    with np.load(demo_bundles / model / "samples.npz") as data:
        return data["input:input"], data["output:logits"]


def test_server_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata()["name"] == "edged"
    index = {row["name"]: row for row in client.get_model_repository_index()}
    for model in DEMO_MODELS:
        assert index[model]["state"] == "READY"
        assert client.is_model_ready(model)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", DEMO_MODELS)
def test_infer_matches_fp32_top1(client, demo_bundles, model, binary):
    x, expected = samples(demo_bundles, model)
    meta = client.get_model_metadata(model)
    assert meta["inputs"][0]["name"] == "input"
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer(model, [inp], outputs=[out])
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    np.testing.assert_array_equal(logits.argmax(axis=1), expected.argmax(axis=1))
    assert result.get_response()["model_version"] == "1.0.0"


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_dimension(client, demo_bundles, batch):
    x, expected = samples(demo_bundles, "digits-onnx")
    inp = triton.InferInput("input", [batch, *x.shape[1:]], "FP32")
    inp.set_data_from_numpy(x[:batch])
    logits = client.infer("digits-onnx", [inp]).as_numpy("logits")
    assert logits.shape == (batch, expected.shape[1])
    np.testing.assert_array_equal(logits.argmax(1), expected[:batch].argmax(1))


def test_int8_native_dtype_passes_through(client, demo_bundles):
    """A client that sends the int8 model's own dtype gets int8 back."""
    manifest = json.loads((demo_bundles / "digits-tflite" / "manifest.json").read_text())
    spec_in, spec_out = manifest["inputs"][0], manifest["outputs"][0]
    assert spec_in["dtype"] == "int8" and spec_out["dtype"] == "int8"
    x, expected = samples(demo_bundles, "digits-tflite")
    qin = spec_in["quantization"]
    q = np.clip(np.round(x / qin["scale"]) + qin["zero_point"], -128, 127).astype(np.int8)
    q = q.reshape([len(x)] + [d for d in spec_in["shape"][1:]])
    inp = triton.InferInput("input", list(q.shape), "INT8")
    inp.set_data_from_numpy(q)
    raw = client.infer("digits-tflite", [inp]).as_numpy("logits")
    assert raw.dtype == np.int8
    qout = spec_out["quantization"]
    logits = (raw.astype(np.float32) - qout["zero_point"]) * qout["scale"]
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))


def test_unknown_model_raises(client):
    inp = triton.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("no-such-model", [inp])


def test_repository_unload_and_load(client):
    client.unload_model("digits-openvino")
    assert not client.is_model_ready("digits-openvino")
    assert client.is_model_ready("digits-onnx")
    client.load_model("digits-openvino")
    assert client.is_model_ready("digits-openvino")


def test_metrics_exposed(daemon, client, demo_bundles):
    x, _ = samples(demo_bundles, "digits-onnx")
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client.infer("digits-onnx", [inp])
    import urllib.request

    text = urllib.request.urlopen(daemon.url + "/metrics").read().decode()
    assert 'edged_inference_requests_total{model="digits-onnx",transport="http",version="1.0.0"}' in text
    assert "edged_inference_duration_seconds_bucket" in text
    assert "edged_queue_duration_seconds_count" in text
    assert 'edged_model_load_duration_seconds{model="digits-tflite",runtime="tflite",version="1.0.0"}' in text
    assert "edged_models_loaded 3.0" in text
