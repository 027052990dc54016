"""Raw HTTP requests (as curl sends them) for every bad input: each gets a
V2 error JSON naming the problem, and the daemon keeps serving."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from edged.bundle import sha256_file
from tests.helpers import http, start_daemon

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def models_dir(demo_bundles, tmp_path_factory):
    """Good copies of two demo bundles, one tampered copy, one whose model
    file is garbage but whose manifest hashes match it."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(demo_bundles / "digits-onnx", root / "digits-onnx")
    shutil.copytree(demo_bundles / "digits-tflite", root / "digits-tflite")
    tampered = root / "tampered"
    shutil.copytree(demo_bundles / "digits-openvino", tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["name"] = "tampered"
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    with open(tampered / manifest["model_file"], "r+b") as handle:
        handle.seek(100)
        handle.write(b"tampered")
    corrupt = root / "corrupt"
    shutil.copytree(demo_bundles / "digits-onnx", corrupt)
    manifest = json.loads((corrupt / "manifest.json").read_text())
    manifest["name"] = "corrupt"
    model = corrupt / manifest["model_file"]
    model.write_bytes(b"this is not an onnx model" * 10)
    manifest["files"][manifest["model_file"]] = {"sha256": sha256_file(model), "size": model.stat().st_size}
    (corrupt / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def daemon(models_dir, tmp_path_factory):
    proc = start_daemon(tmp_path_factory.mktemp("errors"), models_dir, extra_toml="")
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture(scope="module")
def small_limit_daemon(models_dir, tmp_path_factory):
    proc = start_daemon(
        tmp_path_factory.mktemp("limit"), models_dir,
        env={"EDGED_HTTP_MAX_BODY_BYTES": str(LIMIT), "EDGED_LOAD": "digits-onnx"},
    )
    yield proc
    proc.stop()


def infer_body(shape=(1, 1, 8, 8), datatype="FP32", data=None, name="input"):
    count = int(np.prod(shape))
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data if data is not None else [0.5] * count}]}


def check_error(status, body, want_status, *fragments):
    assert status == want_status, body
    assert "error" in body, body
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


def test_good_request_works(daemon):
    status, body = daemon.post("/v2/models/digits-onnx/infer", infer_body())
    assert status == 200 and body["outputs"][0]["shape"] == [1, 10]


def test_unknown_model_and_version_404(daemon):
    check_error(*daemon.post("/v2/models/nope/infer", infer_body()), 404, "unknown model 'nope'")
    check_error(*daemon.post("/v2/models/digits-onnx/versions/9.9.9/infer", infer_body()), 404, "no version '9.9.9'", "1.0.0")
    check_error(*daemon.get("/v2/models/nope"), 404, "nope")
    status, _ = daemon.get("/v2/models/nope/ready")
    assert status == 404


def test_malformed_json_400(daemon):
    check_error(*daemon.post("/v2/models/digits-onnx/infer", b"{\"inputs\": [}"), 400, "malformed JSON")


def test_wrong_dtype_400_names_tensor_expected_and_received(daemon):
    body = infer_body(datatype="INT32", data=[1] * 64)
    check_error(*daemon.post("/v2/models/digits-onnx/infer", body), 400, "input input", "float32", "int32")


def test_wrong_shape_400(daemon):
    check_error(*daemon.post("/v2/models/digits-onnx/infer", infer_body(shape=(1, 64))), 400, "input input", "[-1, 1, 8, 8]", "[1, 64]")


def test_wrong_element_count_400(daemon):
    body = infer_body(data=[0.1] * 63)
    check_error(*daemon.post("/v2/models/digits-onnx/infer", body), 400, "input input", "64 elements", "got 63")


def test_unknown_input_name_400(daemon):
    check_error(*daemon.post("/v2/models/digits-onnx/infer", infer_body(name="pixels")), 400, "pixels")


def test_binary_size_mismatch_400(daemon):
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}).encode()
    status, raw, _ = http(
        "POST", daemon.url + "/v2/models/digits-onnx/infer", header + b"\0" * 100,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    check_error(status, json.loads(raw), 400, "input input", "256 bytes", "100 remain")
    header = header.replace(b"256", b"200")
    status, raw, _ = http(
        "POST", daemon.url + "/v2/models/digits-onnx/infer", header + b"\0" * 200,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    check_error(status, json.loads(raw), 400, "binary_data_size is 200", "needs 256 bytes")


def test_body_over_limit_413(small_limit_daemon):
    payload = json.dumps(infer_body(shape=(300, 1, 8, 8))).encode()
    assert len(payload) > LIMIT
    status, raw, _ = http("POST", small_limit_daemon.url + "/v2/models/digits-onnx/infer", payload)
    check_error(status, json.loads(raw), 413, "limit", str(LIMIT))
    status, _ = small_limit_daemon.post("/v2/models/digits-onnx/infer", infer_body())
    assert status == 200


def test_curl_binary_request_with_expect_continue(daemon, tmp_path):
    """curl sends `Expect: 100-continue` for large bodies; binary inference still works."""
    x = np.random.RandomState(0).rand(32, 1, 8, 8).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    (tmp_path / "body").write_bytes(header + x.tobytes())
    out = subprocess.run(
        ["curl", "-sS", "-D", str(tmp_path / "headers"), "-o", str(tmp_path / "resp"),
         "-H", f"Inference-Header-Content-Length: {len(header)}", "--data-binary", f"@{tmp_path / 'body'}",
         daemon.url + "/v2/models/digits-onnx/infer"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    headers = (tmp_path / "headers").read_text().lower()
    assert "200 ok" in headers
    length = int(headers.split("inference-header-content-length:")[1].split()[0])
    raw = (tmp_path / "resp").read_bytes()
    meta = json.loads(raw[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 32 * 10 * 4
    assert np.frombuffer(raw[length:], np.float32).reshape(32, 10).shape == (32, 10)


def test_tampered_bundle_not_ready_with_reason(daemon):
    status, body = daemon.get("/v2/models/tampered")
    assert status == 200
    assert body["state"] == "FAILED"
    assert "sha256" in body["reason"] and "model" in body["reason"]
    status, _ = daemon.get("/v2/models/tampered/ready")
    assert status == 503
    check_error(*daemon.post("/v2/models/tampered/infer", infer_body()), 503, "not ready")
    assert "tampered" in daemon.logs()


def test_corrupt_model_not_ready_others_serve(daemon):
    status, body = daemon.get("/v2/models/corrupt")
    assert body["state"] == "FAILED" and body["reason"], body
    status, body = daemon.post("/v2/models/digits-tflite/infer", infer_body())
    assert status == 200
    status, _ = daemon.post("/v2/repository/models/corrupt/load", {})
    assert status == 503


def _tensor(**extra):
    return {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64, **extra}


@pytest.mark.parametrize("body,fragment", [
    ({"inputs": [_tensor(parameters=5)]}, "input input: 'parameters' must be a JSON object"),
    ({"inputs": [_tensor(parameters=["binary_data_size"])]}, "input input: 'parameters' must be a JSON object"),
    ({"inputs": [_tensor()], "parameters": [1]}, "request 'parameters' must be a JSON object"),
    ({"inputs": [_tensor()], "parameters": "binary_data_output"}, "request 'parameters' must be a JSON object"),
    ({"inputs": [_tensor()], "outputs": [{"name": "logits", "parameters": "yes"}]}, "output logits: 'parameters' must be a JSON object"),
    ({"inputs": [_tensor()], "id": {"a": 1}}, "'id' must be a string"),
    ({"inputs": [{"name": "input", "shape": [0, 2**62], "datatype": "FP32", "data": []}]}, "too large"),
    ({"inputs": [{"name": "input", "shape": [1] * 70, "datatype": "FP32", "data": [0.5]}]}, "too large"),
    ({"inputs": [_tensor(parameters={"binary_data_size": True})]}, "binary_data_size is True"),
])
def test_malformed_fields_400_not_500(daemon, body, fragment):
    """Defect 6: a non-object `parameters` at any level, or a shape numpy cannot make,
    was a 500 carrying Python exception text."""
    status, reply = daemon.post("/v2/models/digits-onnx/infer", body)
    check_error(status, reply, 400, fragment)
    assert reply["code"] == "invalid_input"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_400(daemon, depth):
    """Defect 6: JSON nested 100,000 deep raised RecursionError (500)."""
    for body in (b'{"inputs":' + b"[" * depth + b"]" * depth + b"}",
                 b'{"inputs":[' + b'{"a":' * depth + b"1" + b"}" * depth + b"]}"):
        status, reply = daemon.post("/v2/models/digits-onnx/infer", body)
        check_error(status, reply, 400)
        assert "Recursion" not in reply["error"]


def test_control_endpoints_refuse_deep_json_with_400(daemon):
    status, reply = daemon.post("/v2/repository/index", b"[" * 100_000 + b"]" * 100_000)
    check_error(status, reply, 400, "malformed JSON")


def test_daemon_survived_everything(daemon):
    assert daemon.alive()
    status, body = daemon.get("/v2/health/live")
    assert status == 200
    status, body = daemon.post("/v2/models/digits-onnx/infer", infer_body())
    assert status == 200
