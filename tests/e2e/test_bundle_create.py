"""`edged bundle create` as real processes: real model files (the demo's ONNX,
TFLite and OpenVINO models, ONNX models quantized by onnxruntime, an fp16 ONNX,
a multi-input model with a 0-d int64 input, a pip-shipped .tflite when the
corpus cache has one) wrapped as they are, verified, served by a real daemon
and compared over HTTP with the runtime run directly; and every refused input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from edged.bundle import open_bundle, sha256_file
from edged.runtimes import RuntimeOptions, create_runtime
from tests.helpers import REPO, run_concurrently, start_daemon

EDGED = [sys.executable, "-m", "edged.cli"]


def edged(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGED, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "COLUMNS": "120", **(env or {})})


@dataclass
class Case:
    name: str  # bundle name
    model: Path
    precision: str
    args: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ models


def _digits_x(demo_data: Path, n: int) -> np.ndarray:
    with np.load(demo_data / "digits_test.npz") as data:
        return data["x"][:n]


def _quantized(src: Path, x: np.ndarray, out: Path) -> tuple[Path, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    qop, dyn = out / "digits_qoperator.onnx", out / "digits_dynamic.onnx"
    quantize_static(str(src), str(qop), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantize_dynamic(str(src), str(dyn), weight_type=QuantType.QInt8)
    return qop, dyn


def _fp16(src: Path, out: Path) -> Path:
    """The fp32 digits model with float16 weights, inputs and outputs."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(src))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model)
    path = out / "digits_fp16.onnx"
    onnx.save(model, str(path))
    return path


def _graph(path: Path, nodes: list, inputs: list, outputs: list, inits: list | None = None) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(helper.make_graph(nodes, path.stem, inputs, outputs, inits or []),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _multi(out: Path) -> Path:
    """x [1,4] and a recurrent state [2,1,4] (batch not dim 0), plus an int64 scalar sr:
    out = (x + sum(state)) * sr / 16000, state_out = state / 2 + x."""
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    return _graph(out / "multi.onnx", [
        helper.make_node("Cast", ["sr"], ["srf"], to=f),
        helper.make_node("Div", ["srf", "k"], ["scale"]),
        helper.make_node("ReduceSum", ["state", "axes0"], ["ssum"], keepdims=0),
        helper.make_node("Add", ["x", "ssum"], ["t"]),
        helper.make_node("Mul", ["t", "scale"], ["out"]),
        helper.make_node("Mul", ["state", "half"], ["sh"]),
        helper.make_node("Add", ["sh", "x"], ["state_out"]),
    ], [
        helper.make_tensor_value_info("x", f, [1, 4]),
        helper.make_tensor_value_info("state", f, [2, 1, 4]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ], [
        helper.make_tensor_value_info("out", f, [1, 4]),
        helper.make_tensor_value_info("state_out", f, [2, 1, 4]),
    ], [numpy_helper.from_array(np.array(16000.0, np.float32), "k"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half")])


def _pool(out: Path) -> Path:
    """img [N,3,H,W] (dynamic H and W) -> mean over H and W -> [N,3]."""
    from onnx import TensorProto, helper

    return _graph(out / "pool.onnx", [helper.make_node("GlobalAveragePool", ["img"], ["p"]),
                                      helper.make_node("Flatten", ["p"], ["mean"], axis=1)],
                  [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                  [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["N", 3])])


def _nan(out: Path) -> Path:
    """sqrt(-x): NaN for every input in 0..1 but 0."""
    from onnx import TensorProto, helper

    return _graph(out / "nan.onnx", [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Sqrt", ["n"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])


def _batch_of_one(out: Path) -> Path:
    """x [N,4] but a Reshape to a fixed [1,4]: any batch but 1 fails at run time."""
    from onnx import TensorProto, helper, numpy_helper

    return _graph(out / "fixed_reshape.onnx", [helper.make_node("Reshape", ["x", "shape"], ["r"]),
                                               helper.make_node("Relu", ["r"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                  [numpy_helper.from_array(np.array([1, 4], np.int64), "shape")])


def _external(src: Path, out: Path) -> Path:
    """The fp32 digits model with its weights in an external data file."""
    import onnx

    (out / "ext").mkdir()
    path = out / "ext" / "digits_external.onnx"
    onnx.save(onnx.load(str(src)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="digits.weights", size_threshold=0)
    return path


def _corpus_tflite() -> Path | None:
    """A pip-shipped .tflite already in the corpus cache (never downloaded here)."""
    try:
        from tests.corpus.fetch import cache_root
    except ImportError:
        return None
    found = sorted((cache_root() / "models").glob("*/*.tflite"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def models(demo_bundles, demo_data, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("models")
    paths = {"fp32": out / "digits_fp32.onnx", "qdq": out / "digits_qdq.onnx", "tflite": out / "digits_int8.tflite",
             "openvino": out / "digits_ov.xml"}
    shutil.copyfile(demo_data / "digits_fp32.onnx", paths["fp32"])
    shutil.copyfile(demo_bundles / "digits-onnx" / "model.onnx", paths["qdq"])
    shutil.copyfile(demo_bundles / "digits-tflite" / "model.tflite", paths["tflite"])
    shutil.copyfile(demo_bundles / "digits-openvino" / "model.xml", paths["openvino"])
    shutil.copyfile(demo_bundles / "digits-openvino" / "model.bin", out / "digits_ov.bin")
    paths["qoperator"], paths["dynamic"] = _quantized(paths["fp32"], _digits_x(demo_data, 64), out)
    paths["fp16"] = _fp16(paths["fp32"], out)
    paths["multi"], paths["pool"], paths["nan"] = _multi(out), _pool(out), _nan(out)
    paths["fixed"], paths["external"] = _batch_of_one(out), _external(paths["fp32"], out)
    np.savez(out / "multi_samples.npz", x=np.arange(12, dtype=np.float32).reshape(3, 4) / 12,
             state=np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 2, 1, 4), sr=np.full(3, 16000, np.int64))
    (out / "labels.txt").write_text("red\ngreen\nblue\n\n")
    return paths


@pytest.fixture(scope="module")
def cases(models) -> list[Case]:
    found = [
        Case("digits-fp32", models["fp32"], "fp32"),
        Case("digits-qdq", models["qdq"], "int8"),
        Case("digits-qoperator", models["qoperator"], "int8"),
        Case("digits-dynamic", models["dynamic"], "int8"),
        Case("digits-fp16", models["fp16"], "fp16"),
        Case("digits-tflite", models["tflite"], "int8"),
        Case("digits-openvino", models["openvino"], "int8"),
        Case("digits-external", models["external"], "fp32"),
        Case("fixed-reshape", models["fixed"], "fp32"),
        Case("multi", models["multi"], "fp32", ["--samples", str(models["multi"].with_name("multi_samples.npz"))]),
        Case("multi-generated", models["multi"], "fp32"),
        Case("pool", models["pool"], "fp32",
             ["--input-shape", "img=1,3,6,10", "--layout", "img=NCHW", "--layout", "mean=NC", "--version", "2.1.0",
              "--labels", str(models["pool"].with_name("labels.txt")), "--hw-profile", "rpi4"]),
    ]
    corpus = _corpus_tflite()
    if corpus is not None:
        found.append(Case("corpus-tflite", corpus, ""))
    return found


@pytest.fixture(scope="module")
def created(cases, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("create") / "bundles"
    procs = run_concurrently([
        partial(edged, "bundle", "create", str(case.model), "--name", case.name, "-o", str(out), *case.args)
        for case in cases
    ])
    for case, proc in zip(cases, procs):
        assert proc.returncode == 0, (case.name, proc.stdout, proc.stderr)
        assert f"wrote {out / case.name}" in proc.stdout and "samples:" in proc.stdout, proc.stdout
    return out


# ------------------------------------------------------------------- tests


def test_qoperator_model_has_com_microsoft_ops(models):
    import onnx

    ops = {(n.domain, n.op_type) for n in onnx.load(str(models["qoperator"])).graph.node}
    assert ("com.microsoft", "QGemm") in ops, ops  # what this test wraps really is an author-quantized model


def test_bundles_verify_and_describe_the_model(created, cases):
    verified = run_concurrently([partial(edged, "bundle", "verify", str(created / case.name)) for case in cases])
    for case, proc in zip(cases, verified):
        root = created / case.name
        assert proc.returncode == 0 and proc.stdout.startswith("ok:"), (case.name, proc.stdout, proc.stderr)
        bundle = open_bundle(root)
        m = bundle.manifest
        prov = m.provenance
        assert prov["tool"] == "edged bundle create" and prov["source"] == case.model.name
        assert prov["source_sha256"] == sha256_file(case.model)
        assert prov["runtime_library"].split()[0] in ("onnxruntime", "ai-edge-litert", "tflite-runtime", "tensorflow", "openvino")
        if case.precision:
            assert prov["precision"] == case.precision, case.name
        model_files = {"onnx": {"model.onnx"}, "tflite": {"model.tflite"}, "openvino": {"model.xml", "model.bin"}}[m.runtime]
        if case.name == "digits-external":
            model_files = model_files | {"digits.weights"}
        assert set(m.files) == model_files | {"samples.npz"}
        # the specs are the runtime's own reading of the model, quantization included
        runtime = create_runtime(m.runtime)
        runtime.load(str(bundle.model_path), RuntimeOptions(threads=1))
        try:
            for declared, actual in ((m.inputs, runtime.inputs), (m.outputs, runtime.outputs)):
                assert [(t.name, t.dtype, t.shape, t.quantization) for t in declared] == \
                       [(t.name, t.dtype, t.shape, t.quantization) for t in actual], case.name
        finally:
            runtime.unload()
        assert 0 < m.tolerance["atol"] <= 1.0 and m.tolerance["rtol"] > 0, m.tolerance
        from edged.model import LoadedModel

        loaded = LoadedModel.load(bundle, RuntimeOptions(threads=1), warmup=1)
        try:
            assert loaded.self_test() <= 1.0, case.name
        finally:
            loaded.unload()


def test_samples_follow_the_model_and_the_options(created, models):
    def samples(name: str) -> dict[str, np.ndarray]:
        with np.load(created / name / "samples.npz") as data:
            return {k: data[k] for k in data.files}

    fp32 = samples("digits-fp32")
    assert fp32["input:input"].shape == (8, 1, 8, 8) and fp32["input:input"].dtype == np.float32
    assert 0 <= fp32["input:input"].min() and fp32["input:input"].max() <= 1
    tfl = samples("digits-tflite")  # int8 input of a quantized model: native int8 over its range
    assert tfl["input:input"].dtype == np.int8 and tfl["input:input"].min() < -64 and tfl["input:input"].max() > 64
    assert samples("digits-fp16")["input:input"].dtype == np.float16

    # multi: the inputs do not stack along dim 0 (state [2,1,4], a 0-d sr): one call, the first sample
    multi = samples("multi")
    with np.load(models["multi"].with_name("multi_samples.npz")) as data:
        np.testing.assert_array_equal(multi["input:x"], data["x"][:1])
        np.testing.assert_array_equal(multi["input:state"], data["state"][0])
        assert multi["input:sr"].shape == () and multi["input:sr"].dtype == np.int64 and int(multi["input:sr"]) == 16000
    assert np.abs(multi["output:out"]).max() > 0
    m = open_bundle(created / "multi").manifest
    assert "one call" in m.provenance["samples"] and "multi_samples.npz (3 samples)" in m.provenance["samples"]
    generated = open_bundle(created / "multi-generated").manifest
    assert "sr int64 [] zeros" in generated.provenance["samples"]
    assert int(samples("multi-generated")["input:sr"]) == 0

    fixed = samples("fixed-reshape")  # the batch of 8 was refused: one sample
    assert fixed["input:x"].shape == (1, 4)
    assert "refused a batch of 8" in open_bundle(created / "fixed-reshape").manifest.provenance["samples"]

    pool = samples("pool")
    assert pool["input:img"].shape == (8, 3, 6, 10)
    m = open_bundle(created / "pool").manifest
    assert (m.version, m.hw_profile, m.labels) == ("2.1.0", "rpi4", ["red", "green", "blue"])
    assert [t.layout for t in m.inputs] == ["NCHW"] and [t.layout for t in m.outputs] == ["NC"]
    assert open_bundle(created / "digits-tflite").manifest.inputs[0].layout == "NCHW"  # channel dim 1 of [-1,1,8,8]


def _direct(bundle_root: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's runtime run directly on ``inputs``, bypassing edged's model layer
    (a model with a fixed batch of 1 sample by sample)."""
    bundle = open_bundle(bundle_root)
    runtime = create_runtime(bundle.manifest.runtime)
    runtime.load(str(bundle.model_path), RuntimeOptions(threads=1))
    try:
        batch_one = all(t.shape[:1] == (1,) for t in bundle.manifest.inputs)
        count = len(next(iter(inputs.values())))
        if not batch_one or count == 1:
            return runtime.infer(inputs)
        parts = [runtime.infer({k: v[i:i + 1] for k, v in inputs.items()}) for i in range(count)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    finally:
        runtime.unload()


def _request_inputs(root: Path, demo_data: Path) -> dict[str, np.ndarray]:
    """Fresh inputs for a bundle: digits test images (quantized for an int8 input), else its samples."""
    m = open_bundle(root).manifest
    with np.load(root / "samples.npz") as data:
        inputs = {k[len("input:"):]: data[k] for k in data.files if k.startswith("input:")}
    if [t.name for t in m.inputs] == ["input"] and m.inputs[0].shape == (-1, 1, 8, 8):
        spec = m.inputs[0]
        x = _digits_x(demo_data, 5)
        inputs = {"input": spec.quantization.quantize(x, np.dtype(spec.dtype)) if spec.quantization else x.astype(spec.dtype)}
    return inputs


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    scale = max(1.0, float(np.abs(want.astype(np.float64)).max()) if want.size else 1.0)
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=0, atol=1e-6 * scale, err_msg=what)


def test_daemon_serves_every_bundle_like_the_runtime(created, cases, demo_data, tmp_path):
    from edged.client import V2Client

    daemon = start_daemon(tmp_path / "d", created)
    try:
        client = V2Client(daemon.url)
        for case in cases:
            status, meta = daemon.get(f"/v2/models/{case.name}/ready")
            assert status == 200, (case.name, meta, daemon.logs()[-3000:])
            inputs = _request_inputs(created / case.name, demo_data)
            want = _direct(created / case.name, inputs)
            got = client.infer(case.name, inputs)  # binary tensors
            assert set(got) == set(want), case.name
            for name in want:
                _same(got[name], want[name], f"{case.name}/{name}")
        # JSON request to the multi-input model: floats, a recurrent state and a 0-d int64
        inputs = _request_inputs(created / "multi", demo_data)
        body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "INT64" if v.dtype == np.int64 else "FP32",
                            "data": v.reshape(-1).tolist()} for k, v in inputs.items()]}
        status, reply = daemon.post("/v2/models/multi/infer", body)
        assert status == 200, reply
        want = _direct(created / "multi", inputs)
        for out in reply["outputs"]:
            _same(np.asarray(out["data"], np.float32).reshape(out["shape"]), want[out["name"]], f"multi/{out['name']} json")
    finally:
        daemon.stop()


def _refused(proc: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists() or not list(out.iterdir()), "no bundle (nor a scratch directory) written"


def test_bad_inputs_are_refused_with_one_error_line(models, tmp_path):
    out = tmp_path / "bundles"
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.onnx").write_text("not a model\n")
    (junk / "notes.tflite").write_bytes(b"\x00" * 64)
    (junk / "model.pb").write_bytes(b"\x00" * 64)
    (junk / "lonely.xml").write_text("<net/>\n")
    (junk / "broken.xml").write_text("<net name='x'><layers></net>\n")
    (junk / "broken.bin").write_bytes(b"\x00" * 16)
    shutil.copyfile(models["openvino"], junk / "nobin.xml")
    np.save(junk / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    npz = {
        "unknown": {"x": np.zeros((2, 4), np.float32), "state": np.zeros((2, 2, 1, 4), np.float32),
                    "sr": np.zeros(2, np.int64), "extra": np.zeros(2)},
        "missing": {"x": np.zeros((2, 4), np.float32), "state": np.zeros((2, 2, 1, 4), np.float32)},
        "shape": {"x": np.zeros((2, 5), np.float32), "state": np.zeros((2, 2, 1, 4), np.float32), "sr": np.zeros(2, np.int64)},
        "dtype": {"x": np.zeros((2, 4), np.int32), "state": np.zeros((2, 2, 1, 4), np.float32), "sr": np.zeros(2, np.int64)},
        "state_rank": {"x": np.zeros((2, 4), np.float32), "state": np.zeros((2, 1, 4), np.float32), "sr": np.zeros(2, np.int64)},
        "counts": {"x": np.zeros((2, 4), np.float32), "state": np.zeros((3, 2, 1, 4), np.float32), "sr": np.zeros(2, np.int64)},
        "sr_float": {"x": np.zeros((2, 4), np.float32), "state": np.zeros((2, 2, 1, 4), np.float32), "sr": np.zeros(2)},
    }
    for key, arrays in npz.items():
        np.savez(junk / f"{key}.npz", **arrays)
    multi, fp32 = str(models["multi"]), str(models["fp32"])
    refused = [
        ([str(junk / "missing.onnx")], ("missing.onnx", "no such file")),
        ([str(junk / "model.pb")], ("model.pb", "unknown model format", ".onnx, .tflite")),
        ([str(junk / "lonely.xml")], ("lonely.xml", "lonely.bin")),
        ([str(junk / "nobin.xml")], ("nobin.bin",)),
        ([str(junk / "notes.onnx")], ("notes.onnx", "not a valid onnx model")),
        ([str(junk / "notes.tflite")], ("notes.tflite", "not a TFLite model")),
        ([str(junk / "broken.xml")], ("broken.xml", "not a valid openvino model")),
        ([str(junk)], ("not a file",)),
        ([fp32, "--hw-profile", "toaster"], ("unknown profile 'toaster'", "rpi4")),
        ([fp32, "--name", "bad name!"], ("--name",)),
        ([fp32, "--version", "1.0"], ("--version", "semver")),
        ([fp32, "--labels", str(junk / "none.txt")], ("--labels",)),
        ([fp32, "--layout", "input=NCH"], ("--layout input=NCH", "rank 4")),
        ([fp32, "--layout", "nope=NC"], ("no tensor 'nope'",)),
        ([fp32, "--input-shape", "input=1,1,9,8"], ("--input-shape input=1,1,9,8", "[-1, 1, 8, 8]")),
        ([fp32, "--input-shape", "other=1,2"], ("no input 'other'",)),
        ([fp32, "--input-shape", "input=1,x"], ("--input-shape",)),
        ([fp32, "--samples", str(junk / "x.npy")], ("x.npy", ".npz")),
        ([fp32, "--samples", str(junk / "nowhere.npz")], ("nowhere.npz", "no such file")),
        ([fp32, "--samples", str(junk / "unknown.npz"), "--input-shape", "input=1,1,8,8"], ("--input-shape", "--samples")),
        ([multi, "--samples", str(junk / "unknown.npz")], ("unknown key(s) 'extra'", "'x', 'state', 'sr'")),
        ([multi, "--samples", str(junk / "missing.npz")], ("no array for input(s) 'sr'",)),
        ([multi, "--samples", str(junk / "shape.npz")], ("input x", "[1, 5]", "[1, 4]")),
        ([multi, "--samples", str(junk / "dtype.npz")], ("input x is float32", "int32")),
        ([multi, "--samples", str(junk / "state_rank.npz")], ("input state", "[N, 2, 1, 4]")),
        ([multi, "--samples", str(junk / "counts.npz")], ("different numbers of samples",)),
        ([multi, "--samples", str(junk / "sr_float.npz")], ("input sr is int64", "float64")),
        ([str(models["nan"])], ("output y", "NaN")),
    ]
    # One output directory per case, so the cases can run side by side and each one's
    # "nothing written" check sees only its own directory.
    outs = [out / str(index) for index in range(len(refused))]
    procs = run_concurrently([partial(edged, "bundle", "create", *args, "-o", str(case_out))
                              for (args, _), case_out in zip(refused, outs)])
    for (args, needles), case_out, proc in zip(refused, outs, procs):
        _refused(proc, case_out, *needles)


def test_missing_runtime_names_the_pip_extra(models, tmp_path):
    """onnxruntime made unimportable in the child process (sys.modules entry None)."""
    out = tmp_path / "bundles"
    code = "import sys; sys.modules['onnxruntime'] = None; from edged.cli import app; app()"
    proc = subprocess.run([sys.executable, "-c", code, "bundle", "create", str(models["fp32"]), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    _refused(proc, out, "runtime onnx is not installed", "pip install 'edged[onnx]'")


def test_help_reads_at_80_columns():
    proc = edged("bundle", "create", "--help", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    text = proc.stdout
    for needle in ("--samples", "--input-shape", "--layout", "--hw-profile", "--labels", "edged[onnx]", "edged[openvino]"):
        assert needle in text, needle


def test_existing_bundle_is_replaced_atomically(models, tmp_path):
    out = tmp_path / "bundles"
    for version in ("1.0.0", "1.0.1"):
        proc = edged("bundle", "create", str(models["fp32"]), "--name", "digits", "--version", version, "-o", str(out))
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["digits"]
    assert json.loads((out / "digits" / "manifest.json").read_text())["version"] == "1.0.1"
