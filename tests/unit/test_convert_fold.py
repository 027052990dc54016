"""Folding a constant scalar input and the If nodes it decides (converters.fold),
on small graphs shaped like silero VAD's: ``sr`` (int64 scalar) picks one of two
branches; another If squeezes a dim only when it is 1. The folded model must
compute what the original does with that value, on onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from converters.data import Samples  # noqa: E402
from converters.fold import constant_scalars, fold_constant_inputs, fold_for_target, fold_model  # noqa: E402
from converters.pipeline import DataOptions, prepare_data  # noqa: E402
from converters.source import inspect_source  # noqa: E402


def sr_model(path=None):
    """y = x * 2 + sum(state) when sr == 16000 (doubled again when x has one
    row), else x * 3: the then-branch reads outer-scope tensors and holds a
    nested If on x's first dim."""
    k16 = numpy_helper.from_array(np.array(16000, np.int64), "k16")
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    idx0 = numpy_helper.from_array(np.array(0, np.int64), "idx0")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    double = helper.make_graph([helper.make_node("Mul", ["t16", "two"], ["dbl"])], "dbl", [],
                               [helper.make_tensor_value_info("dbl", TensorProto.FLOAT, ["b", 4])])
    keep = helper.make_graph([helper.make_node("Identity", ["t16"], ["kept"])], "keep", [],
                             [helper.make_tensor_value_info("kept", TensorProto.FLOAT, ["b", 4])])
    then = helper.make_graph([
        helper.make_node("Mul", ["x", "two"], ["m16"]),
        helper.make_node("ReduceSum", ["state"], ["s16"], keepdims=0),
        helper.make_node("Add", ["m16", "s16"], ["t16"]),
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "idx0"], ["d0"]),
        helper.make_node("Equal", ["d0", "one"], ["is1"]),
        helper.make_node("If", ["is1"], ["y16"], then_branch=double, else_branch=keep),
    ], "then", [], [helper.make_tensor_value_info("y16", TensorProto.FLOAT, ["b", 4])])
    other = helper.make_graph([helper.make_node("Mul", ["x", "three"], ["y8"])], "else", [],
                              [helper.make_tensor_value_info("y8", TensorProto.FLOAT, ["b", 4])])
    graph = helper.make_graph([
        helper.make_node("Equal", ["sr", "k16"], ["is16"]),
        helper.make_node("If", ["is16"], ["y"], then_branch=then, else_branch=other, name="If_sr"),
    ], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
             helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 3]),
             helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [k16, one, idx0, two, three])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
        return path
    return model


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def feeds(batch=1, sr=16000):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(batch, 4)).astype(np.float32), "state": rng.normal(size=(2, 3)).astype(np.float32),
            "sr": np.array(sr, np.int64)}


def test_fold_sr_inlines_the_branch_it_picks_and_keeps_the_values():
    model = sr_model()
    folded = fold_model(model, {"sr": np.array(16000, np.int64)})
    assert folded is not None
    assert [i.name for i in folded.graph.input] == ["x", "state"]
    assert [n.op_type for n in folded.graph.node].count("If") == 1  # the nested one depends on x's dims
    for batch in (1, 3):  # the dynamic batch still works: the shape If stays
        f = feeds(batch)
        np.testing.assert_allclose(run(folded, f), run(model, f), rtol=1e-6)
    eight = fold_model(model, {"sr": np.array(8000, np.int64)})
    np.testing.assert_allclose(run(eight, feeds(2, 8000)), run(model, feeds(2, 8000)), rtol=1e-6)


def test_static_shapes_fold_the_if_on_a_dim():
    model = fold_model(sr_model(), {"sr": np.array(16000, np.int64)})
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    static = fold_model(model, {}, static_shapes=True)
    assert static is not None and not any(n.op_type == "If" for n in static.graph.node)
    np.testing.assert_allclose(run(static, feeds(1)), run(sr_model(), feeds(1)), rtol=1e-6)
    assert fold_model(static, {}, static_shapes=True) is None  # nothing left to fold


def test_only_one_value_in_every_sample_counts_as_constant(tmp_path):
    source = inspect_source(sr_model(tmp_path / "vad.onnx"), [], tmp_path)
    same = Samples({"sr": np.full(5, 16000, np.int64), "x": np.zeros((5, 1, 4), np.float32)})
    mixed = Samples({"sr": np.array([16000, 8000], np.int64), "x": np.zeros((2, 1, 4), np.float32)})
    assert list(constant_scalars(source, [same])) == ["sr"]
    assert constant_scalars(source, [same, mixed]) == {}
    assert fold_constant_inputs(source, [same, mixed], tmp_path) == {}
    assert [i.name for i in source.inputs] == ["x", "state", "sr"]


def test_a_target_that_needs_it_gets_a_folded_copy_without_sr(tmp_path):
    source = inspect_source(sr_model(tmp_path / "vad.onnx"), [], tmp_path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(6, 1, 4)).astype(np.float32),
             state=rng.normal(size=(6, 2, 3)).astype(np.float32), sr=np.full(6, 16000, np.int64))
    data = prepare_data(source, DataOptions(calib=str(tmp_path / "calib.npz")), tmp_path)
    assert data.from_files and "sr" in data.calibration.arrays  # the ONNX runtime keeps sr
    folded, fdata, note = fold_for_target(source, data, tmp_path)
    assert set(fdata.calibration.arrays) == {"x", "state"} and set(fdata.validation.arrays) == {"x", "state"}
    assert [i.name for i in folded.inputs] == ["x", "state"] and folded.path != source.path
    assert "sr=16000" in note and "no such input" in note
    assert [i.name for i in source.inputs] == ["x", "state", "sr"] and "sr" in data.calibration.arrays
    out = folded.run(fdata.validation.sample(0))
    want = run(sr_model(), {**fdata.validation.sample(0), "sr": np.array(16000, np.int64)})
    np.testing.assert_allclose(out["y"], want, rtol=1e-6)
