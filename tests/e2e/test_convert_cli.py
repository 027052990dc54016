"""`edged convert` as real processes with real runtimes: every shipped profile
this machine can run, the bundles served by a real daemon, the accuracy gate
and every refused input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.bundle import open_bundle
from tests.helpers import start_daemon

EDGED = [sys.executable, "-m", "edged.cli"]
INT8_TARGETS = {"tflite", "onnx", "openvino"}


def convert(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGED, "convert", *args, "--latency-runs", "20"],
                          capture_output=True, text=True, timeout=1200, env=env)  # a bound only a hang reaches


@pytest.fixture(scope="module")
def source(demo_data) -> Path:
    return demo_data / "digits_fp32.onnx"


@pytest.fixture(scope="module")
def test_npz(demo_data) -> Path:
    return demo_data / "digits_test.npz"


@pytest.fixture(scope="module")
def converted(source, test_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "bundles"
    proc = convert(str(source), "--all-profiles", "--calib", str(test_npz), "--holdout", str(test_npz),
                   "--name", "digits", "-o", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def _fp32_top1(source: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].argmax(1)


def test_all_profiles_write_one_bundle_each(converted):
    from edged.profiles import all_profiles

    out, proc = converted
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], "no staging directories left behind"
    for prof in all_profiles().values():
        # On this x86 machine every shipped profile converts (TFLite and ONNX run here too);
        # a profile that could not would be listed as skipped with its reason.
        assert f"digits-{prof.name}" in names or f"{prof.name}" in proc.stdout and "skipped" in proc.stdout
        if f"digits-{prof.name}" not in names:
            continue
        bundle = open_bundle(out / f"digits-{prof.name}")  # verifies hashes, report.json included
        m = bundle.manifest
        assert m.hw_profile == prof.name and m.runtime == prof.output
        assert "report.json" in m.files
        report = json.loads((bundle.root / "report.json").read_text())
        assert report == {k: m.validation[k] for k in report}
        for key in ("top1_agreement", "accuracy_source", "accuracy_converted"):
            assert isinstance(report[key], float)
        assert report["task"] == "classify"  # labels in the .npz make it a classifier
        (out_metrics,) = report["outputs"]
        for key in ("cosine", "sqnr_db", "max_abs_error_rel", "mean_abs_error_rel"):
            assert isinstance(out_metrics[key], float)
        assert out_metrics["cosine"] > 0.9 and "collapse" not in out_metrics
        assert set(report["latency_ms"]) == {"source", "converted"} and report["latency_ms"]["converted"]["p99"] > 0
        if report["precision"] == "int8":
            assert report["size_bytes"]["source"] > report["size_bytes"]["converted"] > 0
        else:  # precision auto (the x86 profiles) may ship fp32/fp16 when int8 is not faster here
            assert prof.precision == "auto" and report["precision"] in ("fp32", "fp16")
            assert {c["label"] for c in report["precision_auto"]["candidates"]} >= {"int8", "fp32"}
        assert report["top1_agreement"] >= 0.99 and report["gate"]["passed"]
    jetson = open_bundle(out / "digits-jetson-orin-nano").manifest
    assert jetson.provenance["precision"] == "int8" and "fallback_precision" in jetson.provenance["precision_fallback"]
    assert "fallback_precision" in proc.stdout + proc.stderr
    assert "validation report" in proc.stdout and "latency p99" in proc.stdout


def test_outputs_really_are_int8(converted):
    import onnx
    from ai_edge_litert.interpreter import Interpreter

    out, _ = converted
    for bundle_dir in sorted(out.iterdir()):
        bundle = open_bundle(bundle_dir)
        runtime = bundle.manifest.runtime
        assert runtime in INT8_TARGETS
        if bundle.manifest.validation["precision"] != "int8":
            continue  # auto shipped a float candidate; the report says why (test above)
        if runtime == "tflite":
            interp = Interpreter(model_path=str(bundle.model_path))
            interp.allocate_tensors()
            assert interp.get_input_details()[0]["dtype"] == np.int8
            assert interp.get_output_details()[0]["dtype"] == np.int8
            weights = [t for t in interp.get_tensor_details() if t["name"].endswith("/weights")]
            assert weights and all(t["dtype"] == np.int8 for t in weights)
        elif runtime == "onnx":
            model = onnx.load(str(bundle.model_path))
            ops = [n.op_type for n in model.graph.node]
            assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
            int8_inits = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
            assert int8_inits, "weights stored as int8"
        else:
            xml = bundle.model_path.read_text()
            assert 'type="FakeQuantize"' in xml or 'element_type="i8"' in xml or 'element_type="u8"' in xml


def test_daemon_serves_every_bundle_with_fp32_agreement(converted, source, test_npz, tmp_path):
    from edged.client import V2Client

    out, _ = converted
    with np.load(test_npz) as data:
        x = data["x"]
    want = _fp32_top1(source, x)
    daemon = start_daemon(tmp_path / "d", out)
    try:
        client = V2Client(daemon.url)
        for bundle_dir in sorted(out.iterdir()):
            name = bundle_dir.name
            status, meta = daemon.get(f"/v2/models/{name}/ready")
            assert status == 200, (name, meta, daemon.logs()[-2000:])
            got = np.concatenate([
                client.infer(name, {"input": x[i:i + 150]})["logits"] for i in range(0, len(x), 150)
            ]).argmax(1)
            agreement = float(np.mean(got == want))
            assert agreement >= 0.99, f"{name}: top-1 agreement with fp32 {agreement:.4f}"
    finally:
        daemon.stop()


def test_broken_calibration_fails_the_accuracy_gate(source, test_npz, tmp_path):
    with np.load(test_npz) as data:
        x = data["x"]
    broken = tmp_path / "broken.npz"
    np.savez(broken, x=np.full_like(x[:50], 1e-4))  # ranges near zero: every activation saturates
    out = tmp_path / "out"
    # int8 only, no tuning: the gate itself must refuse (auto or tuning would ship a float candidate)
    proc = convert(str(source), "--profile", "generic-x86", "--calib", str(broken), "--holdout", str(test_npz),
                   "-o", str(out), "--name", "bad", "--precision", "int8", "--tune-budget-s", "0")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "--max-accuracy-drop" in proc.stderr and "no bundle written" in proc.stderr
    assert "FAILED" in proc.stdout and "accuracy" in proc.stdout
    assert not (out / "bad").exists() and not any(out.iterdir())


def _onnx(path: Path, op: str = "Relu", opset: int = 17, dims=("N", 1, 8, 8), domain: str = "") -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node(op, ["f"], ["y"], domain=domain)],
        "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _refused(proc: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert not out.exists() or not any(out.iterdir()), "nothing half-written"


def test_bad_inputs_are_refused(source, test_npz, tmp_path):
    out = tmp_path / "out"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not a model\x00\xff" * 20)
    _refused(convert(str(junk), "--profile", "rpi4", "-o", str(out)), out, "not an ONNX model")

    _refused(convert(str(_onnx(tmp_path / "op99.onnx", opset=99)), "--profile", "generic-x86", "-o", str(out)),
             out, "opset 99")
    _refused(convert(str(_onnx(tmp_path / "custom.onnx", op="FancyOp", domain="com.example")),
                     "--profile", "generic-x86", "-o", str(out)), out, "FancyOp")
    # Sigmoid is standard ONNX but outside the TFLite writer's subset; with no other route
    # (no onnx2tf venv, no convert-torch in .venv) the error names the operator and both routes.
    no_routes = {**os.environ, "EDGED_TF_VENV": str(tmp_path / "no-tf-venv")}
    _refused(convert(str(_onnx(tmp_path / "sig.onnx", op="Sigmoid")), "--profile", "rpi4", "-o", str(out),
                     env=no_routes), out, "Sigmoid", "make install-tf", "convert-torch")

    wrong_shape = tmp_path / "shape.npy"
    np.save(wrong_shape, np.zeros((10, 3, 8, 8), np.float32))
    _refused(convert(str(source), "--profile", "rpi4", "--calib", str(wrong_shape), "-o", str(out)),
             out, "shape mismatch", "expected [N, 1, 8, 8]", "got [10, 3, 8, 8]")
    wrong_dtype = tmp_path / "dtype.npy"
    np.save(wrong_dtype, np.zeros((10, 1, 8, 8), np.uint8))
    _refused(convert(str(source), "--profile", "rpi4", "--calib", str(wrong_dtype), "-o", str(out)),
             out, "expected float32", "got uint8")

    proc = convert(str(source), "--profile", "raspberry-pi-9", "-o", str(out))
    _refused(proc, out, "unknown profile 'raspberry-pi-9'", "rpi4", "jetson-orin-nano")

    dynamic = _onnx(tmp_path / "dyn.onnx", dims=("N", 1, "H", "W"))
    _refused(convert(str(dynamic), "--profile", "rpi4", "-o", str(out)), out, "--input-shape", "dynamic")
    proc = convert(str(dynamic), "--profile", "generic-x86", "--input-shape", "1,1,8,8", "-o", str(out),
                   "--max-accuracy-drop", "100")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert open_bundle(out / "dyn").manifest.inputs[0].shape == (-1, 1, 8, 8)


def test_image_directory_without_pillow_names_the_extra(source, tmp_path):
    import importlib.util

    if importlib.util.find_spec("PIL") is not None:
        pytest.skip("Pillow is installed here")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG")
    out = tmp_path / "out"
    _refused(convert(str(source), "--profile", "rpi4", "--calib", str(images), "-o", str(out)),
             out, "Pillow", "edged[convert-images]")
