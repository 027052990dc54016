"""The `edged` command line, run as real processes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import DEMO_MODELS, start_daemon

EDGED = [sys.executable, "-m", "edged.cli"]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*EDGED, *args], capture_output=True, text=True, timeout=120)
    if ok:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_doctor_prints_runtimes():
    out = run("doctor").stdout
    for runtime in ("tflite", "onnx", "openvino"):
        assert runtime in out
    assert "available" in out and "cpu:" in out


def test_help_teaches():
    out = run("--help").stdout
    for command in ("serve", "infer", "doctor", "bundle", "models"):
        assert command in out


def test_bundle_inspect_and_verify(demo_bundles, tmp_path):
    out = run("bundle", "inspect", str(demo_bundles / "digits-tflite")).stdout
    assert '"runtime": "tflite"' in out and '"sha256"' in out
    assert "files verified" in run("bundle", "verify", str(demo_bundles / "digits-onnx")).stdout
    copy = tmp_path / "copy"
    shutil.copytree(demo_bundles / "digits-onnx", copy)
    (copy / "samples.npz").write_bytes(b"tampered")
    bad = run("bundle", "verify", str(copy), ok=False)
    assert bad.returncode == 1
    assert "samples.npz" in bad.stderr


def test_bad_config_exits_nonzero_naming_key(tmp_path):
    config = tmp_path / "edged.toml"
    config.write_text("[http]\nport = 99999\n")
    out = run("serve", "--config", str(config), ok=False)
    assert out.returncode == 2
    assert "http.port" in out.stderr and str(config) in out.stderr


@pytest.fixture(scope="module")
def daemon(demo_bundles, tmp_path_factory):
    proc = start_daemon(tmp_path_factory.mktemp("cli"), demo_bundles)
    yield proc
    proc.stop()


def test_models_list_and_infer(daemon, demo_bundles, tmp_path):
    out = run("models", "list", "--url", daemon.url).stdout
    for model in DEMO_MODELS:
        assert model in out
    assert "READY" in out
    with np.load(demo_bundles / "digits-tflite" / "samples.npz") as data:
        x, expected = data["input:input"][:1], data["output:logits"][:1]
    np.save(tmp_path / "x.npy", x)
    out = run("infer", "digits-tflite", "--input", str(tmp_path / "x.npy"), "--url", daemon.url).stdout
    assert f"top-1: {expected.argmax()}" in out


def test_infer_reports_unreachable_daemon(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    out = run("infer", "digits-onnx", "--input", str(tmp_path / "x.npy"), "--url", "http://127.0.0.1:9", ok=False)
    assert out.returncode == 1 and "cannot reach" in out.stderr
